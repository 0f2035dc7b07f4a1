"""The training report drawn from a model file: one self-contained HTML page whose charts are
inline SVG (page, svg)."""
