//! airlock-backend (stub, being written).
