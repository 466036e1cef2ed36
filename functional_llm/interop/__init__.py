"""Bridges to other libraries\x27 modules and weights."""
