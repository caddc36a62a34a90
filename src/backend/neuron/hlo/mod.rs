//! XLA HLO modules: the protobuf messages and a builder.

pub mod builder;
pub mod proto;
