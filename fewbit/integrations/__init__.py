"""Integrations with other libraries (imported only when used; none is a dependency)."""
