pub mod crdt;
pub mod ids;
pub mod op;
pub mod store;
pub mod net;
