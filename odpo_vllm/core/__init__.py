"""The mathematics and the batch types: pure functions of tensors, no Ray, no I/O."""
