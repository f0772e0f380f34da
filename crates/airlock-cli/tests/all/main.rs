//! Integration suite: drives the real `airlock` binary, attacks sandboxes
//! from inside, inside the test world of `world` (DESIGN §8). Needs root
//! and the base template (scripts/test.sh provides both).

mod world;

mod agents;
mod attacker;
mod custom_templates;
mod lifecycle;
mod network;
mod real_clients;
mod tls;
mod unprivileged;
mod vm;
