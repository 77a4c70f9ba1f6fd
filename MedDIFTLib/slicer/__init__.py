"""MRML scene glue for the Slicer module: takes the scene as an argument, needs no Qt and no torch."""
