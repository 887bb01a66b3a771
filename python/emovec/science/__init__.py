"""The research's analyses on top of the runtime: geometry of concept vectors, readings where the reply begins,
dose-response, implied emotions, preferences and steering validation. Imports run one way: science -> runtime ->
op."""
