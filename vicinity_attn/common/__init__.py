"""Helpers both operations share: argument validation, the call specs, position features, feature maps,
output allocation, torch.func support and the custom ops' common pieces. Nothing here imports an
operation's package."""
