"""The research's analyses on top of the runtime: geometry of concept vectors (and, as they arrive, the
experiments). Imports run one way: science -> runtime -> op."""
