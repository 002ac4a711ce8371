"""speechtrim.reducers."""
