"""The attention-transfer math (maps, loss), the forward hooks that tap a model's layers, and the one recipe for a
model's attention maps on a batch of images."""
