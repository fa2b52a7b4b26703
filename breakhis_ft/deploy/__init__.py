"""After training: predict on new images, export, explain."""
