//! QEMU's block permissions and the bytes that stand for them.
//!
//! Bit `i` of a [`Perm`] maps to the *permission byte* `100 + i` ("I use it") and to the
//! *unshare byte* `200 + i` ("nobody else may use it"). QEMU starts at byte 100 because libvirt
//! uses byte 0 and keeps a few low bytes for itself.

use std::fmt;

bitflags::bitflags! {
    /// A set of QEMU block permissions (`BLK_PERM_*`).
    ///
    /// The four current permissions are in [`Perm::ALL`]. [`Perm::GRAPH_MOD`] existed up to
    /// QEMU 6.2; it is only locked or probed when [`crate::LockOptions::legacy_graph_mod`] asks.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
    pub struct Perm: u8 {
        /// Read with a consistent view of the data (byte 100 / 200).
        const CONSISTENT_READ = 1 << 0;
        /// Write (byte 101 / 201).
        const WRITE = 1 << 1;
        /// Write data that does not change what a reader sees (byte 102 / 202).
        const WRITE_UNCHANGED = 1 << 2;
        /// Change the size of the file (byte 103 / 203).
        const RESIZE = 1 << 3;
        /// Change the block graph; removed in QEMU 7.0 (byte 104 / 204).
        const GRAPH_MOD = 1 << 4;
    }
}

/// First permission byte ("I use permission i" is byte `PERM_BASE + i`).
pub const PERM_BASE: u64 = 100;
/// First unshare byte ("nobody else may use permission i" is byte `UNSHARE_BASE + i`).
pub const UNSHARE_BASE: u64 = 200;

/// Every protocol byte, in QEMU's lock order: the permission bytes `100..=104`, then the
/// unshare bytes `200..=204` (104/204, graph-mod, only matter to QEMU <= 6.2). The one place
/// these numbers are spelled.
pub const PROTOCOL_BYTES: [u64; 10] = {
    let mut bytes = [0; 10];
    let mut i = 0;
    while i < 5 {
        bytes[i] = PERM_BASE + i as u64;
        bytes[i + 5] = UNSHARE_BASE + i as u64;
        i += 1;
    }
    bytes
};

impl Perm {
    /// The four permissions QEMU >= 7.0 knows (`BLK_PERM_ALL = 0x0f`).
    pub const ALL: Perm = Perm::from_bits_retain(0x0f);
    /// The five permissions of QEMU 2.10 to 6.2 (`BLK_PERM_ALL = 0x1f`).
    pub const LEGACY_ALL: Perm = Perm::from_bits_retain(0x1f);

    /// The name QEMU prints for a single permission, as in `Failed to get "write" lock`.
    ///
    /// Returns `None` unless `self` is exactly one known bit.
    pub fn qemu_name(self) -> Option<&'static str> {
        Some(match self {
            Perm::CONSISTENT_READ => "consistent read",
            Perm::WRITE => "write",
            Perm::WRITE_UNCHANGED => "write unchanged",
            Perm::RESIZE => "resize",
            Perm::GRAPH_MOD => "change children",
            _ => return None,
        })
    }

    /// The name used on qlock's command line and in JSON, as in `--perm consistent-read,write`.
    ///
    /// Returns `None` unless `self` is exactly one known bit.
    pub fn cli_name(self) -> Option<&'static str> {
        Some(match self {
            Perm::CONSISTENT_READ => "consistent-read",
            Perm::WRITE => "write",
            Perm::WRITE_UNCHANGED => "write-unchanged",
            Perm::RESIZE => "resize",
            Perm::GRAPH_MOD => "graph-mod",
            _ => return None,
        })
    }

    /// The bit index `i` of a single permission (0 for consistent read).
    pub fn index(self) -> Option<u32> {
        (self.bits().count_ones() == 1).then(|| self.bits().trailing_zeros())
    }

    /// The permission byte (`100 + i`) of a single permission.
    pub fn perm_byte(self) -> Option<u64> {
        self.index().map(|i| PERM_BASE + u64::from(i))
    }

    /// The unshare byte (`200 + i`) of a single permission.
    pub fn unshare_byte(self) -> Option<u64> {
        self.index().map(|i| UNSHARE_BASE + u64::from(i))
    }

    /// The single permission a protocol byte (one of [`PROTOCOL_BYTES`]) stands for, and
    /// whether it is an unshare byte.
    pub fn from_byte(byte: u64) -> Option<(Perm, bool)> {
        let side = |base: u64| {
            byte.checked_sub(base).filter(|i| *i < u64::from(Perm::LEGACY_ALL.bits().count_ones()))
        };
        let (i, unshare) = match (side(PERM_BASE), side(UNSHARE_BASE)) {
            (Some(i), _) => (i, false),
            (_, Some(i)) => (i, true),
            _ => return None,
        };
        Some((Perm::from_bits_retain(1 << i), unshare))
    }

    /// The single bits of `self` in ascending order, the order QEMU walks them.
    pub fn each(self) -> impl Iterator<Item = Perm> {
        (0..8).map(|i| Perm::from_bits_retain(1 << i)).filter(move |p| self.contains(*p))
    }

    /// Parses one permission by its CLI name or the name QEMU prints.
    pub fn parse_one(name: &str) -> Option<Perm> {
        let name = name.trim();
        [Perm::CONSISTENT_READ, Perm::WRITE, Perm::WRITE_UNCHANGED, Perm::RESIZE, Perm::GRAPH_MOD]
            .into_iter()
            .find(|p| {
                p.cli_name() == Some(name)
                    || p.qemu_name() == Some(name)
                    || (p.cli_name() == Some("graph-mod") && name == "change-children")
            })
    }

    /// Parses a comma-separated list such as `consistent-read,write`; `none` and `all` (the four
    /// current permissions) are accepted too.
    pub fn parse_list(list: &str) -> Result<Perm, String> {
        let mut perm = Perm::empty();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            perm |= match item {
                "none" => Perm::empty(),
                "all" => Perm::ALL,
                _ => Perm::parse_one(item).ok_or_else(|| {
                    format!(
                        "unknown permission {item:?}: expected consistent-read, write, \
                         write-unchanged, resize, graph-mod, all or none"
                    )
                })?,
            };
        }
        Ok(perm)
    }
}

impl fmt::Display for Perm {
    /// Comma-separated CLI names, or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        for (n, p) in self.each().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            f.write_str(p.cli_name().unwrap_or("?"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_and_names_match_qemu() {
        let expect = [
            (Perm::CONSISTENT_READ, 100, 200, "consistent read"),
            (Perm::WRITE, 101, 201, "write"),
            (Perm::WRITE_UNCHANGED, 102, 202, "write unchanged"),
            (Perm::RESIZE, 103, 203, "resize"),
            (Perm::GRAPH_MOD, 104, 204, "change children"),
        ];
        for (p, pb, ub, name) in expect {
            assert_eq!(p.perm_byte(), Some(pb));
            assert_eq!(p.unshare_byte(), Some(ub));
            assert_eq!(p.qemu_name(), Some(name));
            assert_eq!(Perm::from_byte(pb), Some((p, false)));
            assert_eq!(Perm::from_byte(ub), Some((p, true)));
        }
        assert_eq!(Perm::from_byte(105), None);
        assert_eq!((Perm::WRITE | Perm::RESIZE).perm_byte(), None);
    }

    #[test]
    fn parse_and_display_round_trip() {
        let p = Perm::parse_list("consistent-read, write,resize").unwrap();
        assert_eq!(p, Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE);
        assert_eq!(p.to_string(), "consistent-read,write,resize");
        assert_eq!(Perm::parse_list("none").unwrap(), Perm::empty());
        assert_eq!(Perm::parse_list("all").unwrap(), Perm::ALL);
        assert_eq!(Perm::parse_list("write unchanged").unwrap(), Perm::WRITE_UNCHANGED);
        assert!(Perm::parse_list("writ").unwrap_err().contains("unknown permission"));
        assert_eq!(Perm::empty().to_string(), "none");
    }
}
