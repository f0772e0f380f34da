//! airlock-template (stub, being written).
