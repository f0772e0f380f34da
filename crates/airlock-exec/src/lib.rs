//! airlock-exec (stub, being written).
