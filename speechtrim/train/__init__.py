"""speechtrim.train."""
