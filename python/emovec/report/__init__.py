"""Rendering of analysis results: figures (matplotlib, imported only when drawing)."""
