"""speechtrim.eval."""
