//! Integration tests of the egress proxy. Everything listens on and dials 127.0.0.1 only.

mod support;

mod forward;
mod policy;
mod robustness;
