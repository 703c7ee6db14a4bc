pub mod api;
pub mod crdt;
pub mod ids;
pub mod net;
pub mod node;
pub mod op;
pub mod store;
pub mod sync;
