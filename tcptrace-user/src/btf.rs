//! Just enough of a BTF reader to find where a struct member lives in the running
//! kernel (`/sys/kernel/btf/vmlinux`), so the eBPF programs can read kernel socket
//! fields without offsets compiled in: one binary works across kernels.
//!
//! Hand-written because aya 0.14 keeps its BTF member lookup private and the only
//! crate that offers it (btf-rs) is LGPL; the format part needed here is small.

use std::{fs, io, path::Path};

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("not BTF data: {0}")]
    Malformed(&'static str),
    #[error("the kernel's BTF has no struct {0}")]
    NoStruct(String),
    #[error("the kernel's struct {0} has no member {1}")]
    NoMember(String, String),
    #[error("{0}.{1} is a bit field; only whole-byte members can be read")]
    BitField(String, String),
}

#[derive(Clone, Copy)]
struct Type {
    name_off: u32,
    info: u32,
    /// Size for structs, unions and ints; the referenced type id for modifiers.
    size_or_type: u32,
    /// Where the kind-specific data (members...) starts in the type section.
    extra: usize,
}

impl Type {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }
    fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }
    fn kind_flag(&self) -> bool {
        self.info >> 31 == 1
    }
}

/// Parsed type and string sections of one BTF blob.
pub struct Btf {
    types_raw: Vec<u8>,
    strings: Vec<u8>,
    /// Index `id - 1`: type ids start at 1 (0 is void).
    types: Vec<Type>,
}

impl Btf {
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = fs::read(path).map_err(|source| BtfError::Read { path: path.display().to_string(), source })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |o: usize| data.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if u16_at(0) != Some(MAGIC) {
            return Err(BtfError::Malformed("bad magic (or big-endian BTF)"));
        }
        let hdr_len = u32_at(4).ok_or(BtfError::Malformed("short header"))? as usize;
        let field = |i: usize| u32_at(8 + 4 * i).map(|v| v as usize).ok_or(BtfError::Malformed("short header"));
        let (type_off, type_len, str_off, str_len) = (field(0)?, field(1)?, field(2)?, field(3)?);
        if hdr_len < HEADER_LEN {
            return Err(BtfError::Malformed("short header"));
        }
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off).ok_or(BtfError::Malformed("section out of range"))?;
            data.get(start..start.checked_add(len).ok_or(BtfError::Malformed("section out of range"))?)
                .ok_or(BtfError::Malformed("section out of range"))
        };
        let types_raw = section(type_off, type_len)?.to_vec();
        let strings = section(str_off, str_len)?.to_vec();

        let mut types = Vec::new();
        let mut at = 0;
        let rd = |o: usize| {
            types_raw
                .get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(BtfError::Malformed("truncated type"))
        };
        while at < types_raw.len() {
            let t = Type { name_off: rd(at)?, info: rd(at + 4)?, size_or_type: rd(at + 8)?, extra: at + 12 };
            let extra_len = match t.kind() {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * t.vlen(),
                KIND_ENUM | KIND_FUNC_PROTO => 8 * t.vlen(),
                0..=19 => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            at = t.extra + extra_len;
            if at > types_raw.len() {
                return Err(BtfError::Malformed("truncated type"));
            }
            types.push(t);
        }
        Ok(Self { types_raw, strings, types })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    fn get(&self, id: u32) -> Option<&Type> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.get(id)?;
            match t.kind() {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = t.size_or_type,
                _ => return Some(t),
            }
        }
        None
    }

    /// (name_off, type id, raw offset) of each member of a struct or union.
    fn members<'a>(&'a self, t: &Type) -> impl Iterator<Item = (u32, u32, u32)> + 'a {
        let base = t.extra;
        (0..t.vlen()).filter_map(move |i| {
            let m = self.types_raw.get(base + 12 * i..base + 12 * i + 12)?;
            let word = |k: usize| u32::from_le_bytes([m[k], m[k + 1], m[k + 2], m[k + 3]]);
            Some((word(0), word(4), word(8)))
        })
    }

    /// Byte offset of `member` in `struct <name>`, looking inside anonymous nested
    /// structs and unions as C does.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        self.member(name, member).map(|(offset, _)| offset)
    }

    /// Whether `member` of `struct <name>` is a pointer (typedefs and qualifiers
    /// followed): the same field is embedded on some kernels and pointed to on others.
    pub fn member_is_pointer(&self, name: &str, member: &str) -> Result<bool, BtfError> {
        self.member_kind(name, member).map(|k| k == Some(KIND_PTR))
    }

    /// Whether `member` of `struct <name>` is an array (`int range[2]` on some
    /// kernels, one packed `u32` on others).
    pub fn member_is_array(&self, name: &str, member: &str) -> Result<bool, BtfError> {
        self.member_kind(name, member).map(|k| k == Some(KIND_ARRAY))
    }

    fn member_kind(&self, name: &str, member: &str) -> Result<Option<u32>, BtfError> {
        let (_, ty) = self.member(name, member)?;
        Ok(self.resolve(ty).map(Type::kind))
    }

    /// The value of the enumerator `name` (in any enum, as C scopes them): where a
    /// kernel counter sits in its MIB array, e.g. `LINUX_MIB_SYNCOOKIESSENT`.
    pub fn enum_value(&self, name: &str) -> Option<u32> {
        self.types.iter().filter(|t| t.kind() == KIND_ENUM).find_map(|t| {
            (0..t.vlen()).find_map(|i| {
                let e = self.types_raw.get(t.extra + 8 * i..t.extra + 8 * i + 8)?;
                let word = |k: usize| u32::from_le_bytes([e[k], e[k + 1], e[k + 2], e[k + 3]]);
                (self.name(word(0)) == name.as_bytes()).then(|| word(4))
            })
        })
    }

    /// Every enumerator (name, value) of the enum `name`; empty when there is none.
    pub fn enumerators(&self, name: &str) -> Vec<(String, u32)> {
        let Some(t) = self.types.iter().find(|t| t.kind() == KIND_ENUM && self.name(t.name_off) == name.as_bytes())
        else {
            return Vec::new();
        };
        (0..t.vlen())
            .filter_map(|i| {
                let e = self.types_raw.get(t.extra + 8 * i..t.extra + 8 * i + 8)?;
                let word = |k: usize| u32::from_le_bytes([e[k], e[k + 1], e[k + 2], e[k + 3]]);
                Some((String::from_utf8_lossy(self.name(word(0))).into_owned(), word(4)))
            })
            .collect()
    }

    /// Byte offset and type id of `member`.
    fn member(&self, name: &str, member: &str) -> Result<(u32, u32), BtfError> {
        let st = self
            .types
            .iter()
            .find(|t| t.kind() == KIND_STRUCT && t.vlen() > 0 && self.name(t.name_off) == name.as_bytes())
            .ok_or_else(|| BtfError::NoStruct(name.to_string()))?;
        let bits = self
            .find_member(st, member.as_bytes(), 0)
            .ok_or_else(|| BtfError::NoMember(name.to_string(), member.to_string()))?;
        match bits {
            (Some(bits), ty) if bits % 8 == 0 => u32::try_from(bits / 8)
                .map(|offset| (offset, ty))
                .map_err(|_| BtfError::Malformed("member offset out of range")),
            _ => Err(BtfError::BitField(name.to_string(), member.to_string())),
        }
    }

    /// Bit offset of `member` (None inside if it is a bit field) and its type id,
    /// searched depth first. In u64: nested offsets add up, and corrupted ones must
    /// not overflow.
    fn find_member(&self, t: &Type, member: &[u8], depth: u32) -> Option<(Option<u64>, u32)> {
        if depth > 8 {
            return None;
        }
        let flag = t.kind_flag();
        for (name_off, ty, raw) in self.members(t) {
            let (bit_off, bitfield) = if flag { (raw & 0xff_ffff, raw >> 24) } else { (raw, 0) };
            if name_off != 0 && self.name(name_off) == member {
                return Some(((bitfield == 0).then_some(u64::from(bit_off)), ty));
            }
            if name_off == 0 {
                if let Some(inner) = self.resolve(ty).filter(|i| matches!(i.kind(), KIND_STRUCT | KIND_UNION)) {
                    if let Some((found, ty)) = self.find_member(inner, member, depth + 1) {
                        return Some((found.map(|b| b + u64::from(bit_off)), ty));
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob: `struct outer { int a; union { int x; char y; }; int flag:1; int z; }`
    /// with `z` at byte 12 and `y` inside the anonymous union at byte 4.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0x\0y\0flag\0z\0".to_vec();
        let s = |name: &str| {
            strings.windows(name.len() + 2).position(|w| &w[1..w.len() - 1] == name.as_bytes() && w[0] == 0).unwrap()
                as u32
                + 1
        };
        let mut t = Vec::new();
        let mut push = |words: &[u32]| words.iter().for_each(|w| t.extend_from_slice(&w.to_le_bytes()));
        // 1: int (size 4), its extra word.
        push(&[s("int"), KIND_INT << 24, 4, 32]);
        // 2: anonymous union { int x; int y; }
        push(&[0, (KIND_UNION << 24) | 2, 4, s("x"), 1, 0, s("y"), 1, 0]);
        // 3: struct outer, kind_flag set (bit field encoding), 4 members.
        push(&[s("outer"), (1 << 31) | (KIND_STRUCT << 24) | 4, 16]);
        push(&[s("a"), 1, 0, 0, 2, 32, s("flag"), 1, (1 << 24) | 64, s("z"), 1, 96]);
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for v in [HEADER_LEN as u32, 0, t.len() as u32, t.len() as u32, strings.len() as u32] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&t);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_direct_and_nested_members() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("outer", "a").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "y").unwrap(), 4);
        assert_eq!(btf.member_offset("outer", "z").unwrap(), 12);
        assert!(matches!(btf.member_offset("outer", "flag"), Err(BtfError::BitField(..))));
        assert!(!btf.member_is_pointer("outer", "z").unwrap());
        assert!(matches!(btf.member_offset("outer", "nope"), Err(BtfError::NoMember(..))));
        assert!(matches!(btf.member_offset("inner", "x"), Err(BtfError::NoStruct(..))));
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0]).is_err());
        let mut truncated = sample();
        truncated.truncate(40);
        assert!(Btf::parse(&truncated).is_err());
        let mut wrong = sample();
        wrong[0] = 0;
        assert!(Btf::parse(&wrong).is_err());
    }

    #[test]
    fn reads_the_running_kernel_when_it_has_btf() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            return; // Not every build machine has BTF; the root tests cover the kernel.
        }
        let btf = Btf::from_file(path).unwrap();
        let srtt = btf.member_offset("tcp_sock", "srtt_us").unwrap();
        assert!(!btf.member_is_pointer("tcp_sock", "srtt_us").unwrap());
        assert!(btf.member_is_pointer("inet_timewait_death_row", "hashinfo").unwrap());
        assert!(!btf.member_is_array("inet_timewait_death_row", "hashinfo").unwrap());
        let err = btf.member_offset("sock", "sk_err").unwrap();
        assert!(srtt > 512 && srtt < 8192, "tcp_sock.srtt_us at {srtt}");
        assert!(err > 0 && err < 2048, "sock.sk_err at {err}");
        let reasons = btf.enumerators("skb_drop_reason");
        let named = |n: &str| reasons.iter().find(|(name, _)| name == n).map(|&(_, v)| v);
        assert!(named("SKB_DROP_REASON_NOT_SPECIFIED").is_some(), "{reasons:?}");
        assert!(named("SKB_DROP_REASON_NETFILTER_DROP").is_some(), "{reasons:?}");
        assert!(btf.enumerators("no_such_enum").is_empty());
    }
}
