"""The training report drawn from a model file: one HTML page with inline SVG charts (page, svg)
and PNG figures."""
