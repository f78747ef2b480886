//! The stream registry file (`streams.reg`), rewritten atomically on change,
//! and small file helpers.
//!
//! ```text
//!  header (32 bytes)                      entry (40 bytes each; 24 in version 1)
//!  0   8  magic "KXREG001"               0   4  stream_id
//!  8   4  crc32 of bytes 12..end          4   1  durability (0 memory, 1 flush, 2 fsync)
//!  12  4  version (2; 1 is still read)    5   1  flags (bit 0: deleted)
//!  16  8  segment_size                    6   2  zero
//!  24  4  entry count                     8   8  first_offset: offsets below are not
//!  28  4  zero                                   served (an older incarnation, or the
//!                                                 stream's own retention moved it)
//!                                         16  8  floor: offsets below are used up
//!                                         24  8  retention bytes (u64::MAX: none)   v2
//!                                         32  8  retention age ns (u64::MAX: none)  v2
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use kaelix_protocol::DurabilityLevel;

use crate::log::StreamRetention;

const MAGIC: u64 = u64::from_le_bytes(*b"KXREG001");
const VERSION: u32 = 2;
const HEADER_LEN: usize = 32;
const ENTRY_LEN: usize = 40;
/// Entries of version 1 (no per-stream retention).
const ENTRY_LEN_V1: usize = 24;
/// "No limit" in the retention fields.
const NONE: u64 = u64::MAX;

/// One stream as the registry stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RegistryEntry {
    pub stream_id: u32,
    pub durability: DurabilityLevel,
    pub deleted: bool,
    pub first_offset: u64,
    pub floor: u64,
    pub retention: StreamRetention,
}

/// Encode a registry.
pub(crate) fn encode(segment_size: u64, entries: &[RegistryEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + entries.len() * ENTRY_LEN);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&segment_size.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for entry in entries {
        out.extend_from_slice(&entry.stream_id.to_le_bytes());
        out.push(entry.durability as u8);
        out.push(u8::from(entry.deleted));
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&entry.first_offset.to_le_bytes());
        out.extend_from_slice(&entry.floor.to_le_bytes());
        for limit in [entry.retention.bytes, entry.retention.age_ns] {
            out.extend_from_slice(&limit.unwrap_or(NONE).to_le_bytes());
        }
    }
    let crc = crc32fast::hash(&out[12..]);
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decode a registry: `(segment_size, entries)`.
pub(crate) fn decode(bytes: &[u8]) -> Result<(u64, Vec<RegistryEntry>), String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!(
            "registry is {} bytes, header needs {HEADER_LEN}",
            bytes.len()
        ));
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    if u64_at(0) != MAGIC {
        return Err("bad registry magic".into());
    }
    let crc = crc32fast::hash(&bytes[12..]);
    if crc != u32_at(8) {
        return Err(format!(
            "registry crc mismatch: stored 0x{:08x}, computed 0x{crc:08x}",
            u32_at(8)
        ));
    }
    let entry_len = match u32_at(12) {
        1 => ENTRY_LEN_V1,
        VERSION => ENTRY_LEN,
        other => return Err(format!("unsupported registry version {other}")),
    };
    let count = u32_at(24) as usize;
    if bytes.len() != HEADER_LEN + count * entry_len {
        return Err(format!(
            "registry is {} bytes, {count} entries need {}",
            bytes.len(),
            HEADER_LEN + count * entry_len
        ));
    }
    let limit = |value: u64| (value != NONE).then_some(value);
    let mut entries = Vec::with_capacity(count);
    for i in 0..count {
        let at = HEADER_LEN + i * entry_len;
        let durability = DurabilityLevel::from_u8(bytes[at + 4]).ok_or_else(|| {
            format!(
                "stream {} has unknown durability {}",
                u32_at(at),
                bytes[at + 4]
            )
        })?;
        if bytes[at + 5] > 1 {
            return Err(format!(
                "stream {} has unknown flags {}",
                u32_at(at),
                bytes[at + 5]
            ));
        }
        entries.push(RegistryEntry {
            stream_id: u32_at(at),
            durability,
            deleted: bytes[at + 5] == 1,
            first_offset: u64_at(at + 8),
            floor: u64_at(at + 16),
            retention: if entry_len == ENTRY_LEN {
                StreamRetention {
                    bytes: limit(u64_at(at + 24)),
                    age_ns: limit(u64_at(at + 32)),
                }
            } else {
                StreamRetention::default()
            },
        });
    }
    Ok((u64_at(16), entries))
}

/// Replace `path` with `bytes` atomically: write a temporary file, optionally
/// fsync it, rename it over `path`, and fsync the directory when `sync`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(bytes)?;
        if sync {
            file.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if sync {
            sync_parent(path)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// fsync the directory holding `path`, so a created or renamed entry is durable.
pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_round_trip_and_damage() {
        let entries = vec![
            RegistryEntry {
                stream_id: 1,
                durability: DurabilityLevel::Fsync,
                deleted: false,
                first_offset: 0,
                floor: 10,
                retention: StreamRetention {
                    bytes: Some(1 << 20),
                    age_ns: None,
                },
            },
            RegistryEntry {
                stream_id: 9,
                durability: DurabilityLevel::Memory,
                deleted: true,
                first_offset: 5,
                floor: 7,
                retention: StreamRetention {
                    bytes: None,
                    age_ns: Some(60_000_000_000),
                },
            },
        ];
        let bytes = encode(4 << 20, &entries);
        assert_eq!(decode(&bytes).unwrap(), (4 << 20, entries));
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 1;
            assert!(decode(&bad).is_err(), "flip at {at} accepted");
        }
        assert!(decode(&bytes[..40]).is_err());
    }

    #[test]
    fn version_1_registries_are_still_read() {
        // Version 1: 24-byte entries without retention.
        let mut v1 = Vec::new();
        v1.extend_from_slice(&MAGIC.to_le_bytes());
        v1.extend_from_slice(&0u32.to_le_bytes());
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&(4u64 << 20).to_le_bytes());
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&0u32.to_le_bytes());
        v1.extend_from_slice(&3u32.to_le_bytes());
        v1.extend_from_slice(&[2, 0, 0, 0]);
        v1.extend_from_slice(&4u64.to_le_bytes());
        v1.extend_from_slice(&9u64.to_le_bytes());
        let crc = crc32fast::hash(&v1[12..]);
        v1[8..12].copy_from_slice(&crc.to_le_bytes());
        let (size, entries) = decode(&v1).unwrap();
        assert_eq!(size, 4 << 20);
        assert_eq!(
            entries,
            vec![RegistryEntry {
                stream_id: 3,
                durability: DurabilityLevel::Fsync,
                deleted: false,
                first_offset: 4,
                floor: 9,
                retention: StreamRetention::default(),
            }]
        );
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("streams.reg");
        write_atomic(&path, b"one", true).unwrap();
        write_atomic(&path, b"two", false).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert!(!path.with_extension("tmp").exists());
    }
}
