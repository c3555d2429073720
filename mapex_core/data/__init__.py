"""Data: sensor readers, co-registration, the chip store and its datasets."""
