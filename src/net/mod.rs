//! libp2p behaviours and wire formats (see the swarm issue).
