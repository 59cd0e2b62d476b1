"""The bottom layer: errors, atomic files and locks, the name registry, statistics, progress bars."""
