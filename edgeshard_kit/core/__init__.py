"""The kit's foundation, imported by every layer: errors, the unit convention (Stage), number/size parsing, JSON/CSV I/O."""
