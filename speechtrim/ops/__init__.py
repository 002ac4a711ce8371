"""speechtrim.ops."""
