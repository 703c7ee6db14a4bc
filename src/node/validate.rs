//! Checks of client input, shared by the library API and the HTTP API.

use super::NodeError;

/// Longest collection (register, counter, lease) or cluster name.
pub const MAX_NAME_LEN: usize = 128;
/// Longest lease holder name.
pub const MAX_HOLDER_LEN: usize = 256;

/// A collection or cluster name: 1 to 128 characters of `A-Z a-z 0-9 _ - .`.
pub fn name(what: &str, name: &str) -> Result<(), NodeError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(NodeError::InvalidInput(format!(
            "{what} name {name:?} is invalid: use 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 _ - ."
        )))
    }
}

pub fn key(key: &[u8], max: usize) -> Result<(), NodeError> {
    if key.is_empty() {
        return Err(NodeError::InvalidInput("key is empty".into()));
    }
    if key.len() > max {
        return Err(NodeError::InvalidInput(format!("key is {} bytes, the limit is {max}", key.len())));
    }
    Ok(())
}

pub fn value(value: &[u8], max: usize) -> Result<(), NodeError> {
    if value.len() > max {
        return Err(NodeError::ValueTooLarge { size: value.len(), max });
    }
    Ok(())
}

pub fn holder(holder: &str) -> Result<(), NodeError> {
    if holder.is_empty() || holder.len() > MAX_HOLDER_LEN {
        return Err(NodeError::InvalidInput(format!("holder must be 1 to {MAX_HOLDER_LEN} bytes")));
    }
    Ok(())
}

pub fn ttl(ttl_ms: u64, max: u64) -> Result<(), NodeError> {
    if ttl_ms == 0 || ttl_ms > max {
        return Err(NodeError::InvalidInput(format!("ttl_ms must be between 1 and {max}")));
    }
    Ok(())
}
