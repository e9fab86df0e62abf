//! tracefs: where it is, mounting it when it is missing, and the record layouts its
//! `format` files describe. Only classic tracepoints need any of this (raw
//! tracepoints are attached by name and read the socket at BTF offsets).

use std::{
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
};

use log::info;
use tcptrace_common::{RecordLayout, ABSENT, SPAN_MAX};

use crate::error::{Error, Result};

const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// Returns the tracefs directory, mounting tracefs at /sys/kernel/tracing when no
/// tracefs is mounted yet (a fresh machine has an empty directory there).
pub fn ensure_mounted() -> Result<PathBuf> {
    for dir in [TRACEFS, DEBUGFS_TRACING] {
        match fs::read_dir(Path::new(dir).join("events")) {
            Ok(_) => return Ok(PathBuf::from(dir)),
            // Mounted but closed to us: mode 0700 root. Mounting again would not help.
            Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
                return Err(Error::TracefsUnreadable { path: PathBuf::from(dir) })
            }
            Err(_) => {}
        }
    }
    let path = PathBuf::from(TRACEFS);
    mount(&path).map_err(|source| Error::Tracefs { path: path.clone(), source })?;
    info!("mounted tracefs at {TRACEFS}");
    Ok(path)
}

fn mount(path: &Path) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::mount(c"nodev".as_ptr(), target.as_ptr(), c"tracefs".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if path.join("events").is_dir() {
        Ok(())
    } else {
        Err(io::Error::other("mounted, but it shows no events directory"))
    }
}

/// One `field:` line of a tracepoint's `format` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u16,
    pub size: u16,
}

/// A tracepoint's record as its `format` file describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Format {
    pub fields: Vec<Field>,
}

/// A `format` file that does not read as one.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("malformed field line {0:?}")]
    Line(String),
    #[error("the record has no field {0}")]
    Missing(&'static str),
    #[error("field {name} is {size} bytes, expected {expected}")]
    Size { name: &'static str, size: u16, expected: u16 },
    #[error("a field at offset {0} is not aligned for a single load")]
    Unaligned(u16),
    #[error("the fields read end at byte {0}, past the {max} bytes one read copies", max = SPAN_MAX)]
    Span(u32),
}

impl Format {
    /// Parses the text of `events/<category>/<name>/format`.
    pub fn parse(text: &str) -> Result<Self, FormatError> {
        let mut fields = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| l.starts_with("field:")) {
            let bad = || FormatError::Line(line.to_string());
            let mut decl = None;
            let (mut offset, mut size) = (None, None);
            for part in line.split(';').map(str::trim) {
                if let Some(d) = part.strip_prefix("field:") {
                    decl = Some(d);
                } else if let Some(o) = part.strip_prefix("offset:") {
                    offset = o.parse::<u16>().ok();
                } else if let Some(s) = part.strip_prefix("size:") {
                    size = s.parse::<u16>().ok();
                }
            }
            // `const void * skaddr`, `__u8 saddr[4]`, `__data_loc char[] name`: the
            // name is the last word, without an array suffix.
            let word = decl.and_then(|d| d.split_whitespace().last()).ok_or_else(bad)?;
            let name = word.split('[').next().unwrap_or_default().trim_start_matches('*');
            if name.is_empty() {
                return Err(bad());
            }
            fields.push(Field { name: name.to_string(), offset: offset.ok_or_else(bad)?, size: size.ok_or_else(bad)? });
        }
        Ok(Self { fields })
    }

    fn find(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Offset of a field that must exist with this size.
    fn required(&self, name: &'static str, expected: u16) -> Result<u16, FormatError> {
        let f = self.find(name).ok_or(FormatError::Missing(name))?;
        if f.size != expected {
            return Err(FormatError::Size { name, size: f.size, expected });
        }
        // ABSENT would read as "no such field"; it is far past one read anyway.
        if f.offset == ABSENT {
            return Err(FormatError::Span(u32::from(f.offset) + u32::from(expected)));
        }
        Ok(f.offset)
    }

    /// Offset of a field some kernels lack; [`ABSENT`] then. A wrong size is still an
    /// error: reading the wrong bytes is worse than not reading.
    fn optional(&self, name: &'static str, expected: u16) -> Result<u16, FormatError> {
        match self.required(name, expected) {
            Err(FormatError::Missing(_)) => Ok(ABSENT),
            other => other,
        }
    }
}

/// The tracepoints tcptrace reads, by the layout their classic program needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    SetState,
    RetransmitSkb,
    RetransmitSynack,
    ReceiveReset,
    SendReset,
}

impl Record {
    /// The fields this tracepoint's classic program reads, at this kernel's offsets.
    pub fn layout(self, format: &Format) -> Result<RecordLayout, FormatError> {
        let mut at = RecordLayout::ABSENT;
        // Resets sent are only counted, by state: the one field read, with a helper
        // (6.10 replaced its ports and addresses by two sockaddrs).
        if self == Self::SendReset {
            at.old_state = format.required("state", 4)?;
            at.span = at.old_state + 4;
            return Ok(at);
        }
        at.skaddr = format.required("skaddr", 8)?;
        at.sport = format.required("sport", 2)?;
        at.dport = format.required("dport", 2)?;
        at.saddr_v6 = format.required("saddr_v6", 16)?;
        at.daddr_v6 = format.required("daddr_v6", 16)?;
        at.family = format.optional("family", 2)?;
        match self {
            Self::SetState => {
                at.old_state = format.required("oldstate", 4)?;
                at.new_state = format.required("newstate", 4)?;
                at.protocol = format.required("protocol", 2)?;
            }
            Self::RetransmitSkb => at.old_state = format.required("state", 4)?,
            Self::RetransmitSynack | Self::ReceiveReset | Self::SendReset => {}
        }
        // One read copies the record's first `span` bytes; the IPv6 addresses are
        // copied two bytes at a time (records only 2-align them).
        let fields = [
            (at.skaddr, 8),
            (at.old_state, 4),
            (at.new_state, 4),
            (at.protocol, 2),
            (at.sport, 2),
            (at.dport, 2),
            (at.family, 2),
            (at.saddr_v6, 2),
            (at.daddr_v6, 2),
        ];
        for (offset, align) in fields.into_iter().filter(|&(o, _)| o != ABSENT) {
            if offset % align != 0 {
                return Err(FormatError::Unaligned(offset));
            }
        }
        // In u32: a field near the end of u16's range (a corrupted file) must not wrap.
        let ends = [(at.skaddr, 8), (at.old_state, 4), (at.new_state, 4), (at.protocol, 2), (at.sport, 2)];
        let more = [(at.dport, 2), (at.family, 2), (at.saddr_v6, 16), (at.daddr_v6, 16)];
        let span = ends.into_iter().chain(more).filter(|&(o, _)| o != ABSENT).map(|(o, len)| u32::from(o) + len).max();
        let span = span.unwrap_or(0);
        if span > u32::from(SPAN_MAX) {
            return Err(FormatError::Span(span));
        }
        at.span = span as u16;
        Ok(at)
    }
}

/// Reads and parses `events/<category>/<name>/format` under `tracefs`.
pub fn read_format(tracefs: &Path, category: &str, name: &str) -> io::Result<Format> {
    let path = tracefs.join("events").join(category).join(name).join("format");
    let text = fs::read_to_string(&path)?;
    Format::parse(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The format files of real kernels, exactly as they print them.
    fn fixture(kernel: &str, name: &str) -> Format {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kernels").join(kernel).join(name);
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Format::parse(&text).unwrap()
    }

    const KERNELS: [&str; 4] = ["5.10.0-32-amd64", "6.1.0-56-amd64", "6.12.117+deb12-amd64", "6.18.44-fc-v657"];

    #[test]
    fn set_state_has_one_layout_on_every_kernel() {
        for k in KERNELS {
            let at = Record::SetState.layout(&fixture(k, "inet_sock_set_state.format")).unwrap();
            assert_eq!((at.skaddr, at.old_state, at.new_state, at.protocol), (8, 16, 20, 30), "{k}");
            assert_eq!((at.sport, at.dport, at.family, at.saddr_v6, at.daddr_v6), (24, 26, 28, 40, 56), "{k}");
            assert_eq!(at.span, 72, "{k}");
        }
    }

    #[test]
    fn tcp_records_of_5_10_have_no_family_and_everything_after_dport_moves() {
        let old = Record::RetransmitSkb.layout(&fixture("5.10.0-32-amd64", "tcp_retransmit_skb.format")).unwrap();
        assert_eq!(old.family, ABSENT);
        assert_eq!(
            (old.skaddr, old.old_state, old.sport, old.dport, old.saddr_v6, old.daddr_v6),
            (16, 24, 28, 30, 40, 56)
        );
        for k in &KERNELS[1..] {
            let new = Record::RetransmitSkb.layout(&fixture(k, "tcp_retransmit_skb.format")).unwrap();
            assert_eq!((new.family, new.saddr_v6, new.daddr_v6), (32, 42, 58), "{k}");
        }
        let reset = Record::ReceiveReset.layout(&fixture("5.10.0-32-amd64", "tcp_receive_reset.format")).unwrap();
        assert_eq!((reset.family, reset.saddr_v6, reset.daddr_v6), (ABSENT, 28, 44));
        let reset = Record::ReceiveReset.layout(&fixture("6.1.0-56-amd64", "tcp_receive_reset.format")).unwrap();
        assert_eq!((reset.family, reset.saddr_v6, reset.daddr_v6), (20, 30, 46));
        let synack =
            Record::RetransmitSynack.layout(&fixture("5.10.0-32-amd64", "tcp_retransmit_synack.format")).unwrap();
        assert_eq!((synack.skaddr, synack.sport, synack.saddr_v6), (8, 24, 36));
    }

    #[test]
    fn a_field_added_at_the_end_changes_nothing() {
        // 6.18 appends `int err` to tcp_retransmit_skb.
        let f = fixture("6.18.44-fc-v657", "tcp_retransmit_skb.format");
        assert_eq!(f.find("err").map(|e| (e.offset, e.size)), Some((76, 4)));
        let six_one = fixture("6.1.0-56-amd64", "tcp_retransmit_skb.format");
        assert_eq!(Record::RetransmitSkb.layout(&f), Record::RetransmitSkb.layout(&six_one));
    }

    #[test]
    fn wrong_or_missing_fields_are_errors_not_guesses() {
        let text = "format:\n\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
                    \tfield:__u16 sport;\toffset:16;\tsize:4;\tsigned:0;\n";
        let f = Format::parse(text).unwrap();
        assert_eq!(Record::ReceiveReset.layout(&f), Err(FormatError::Size { name: "sport", size: 4, expected: 2 }));
        let f = Format::parse("field:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;").unwrap();
        assert_eq!(Record::ReceiveReset.layout(&f), Err(FormatError::Missing("sport")));
        assert!(matches!(Format::parse("field:int x;\toffset:zz;\tsize:4;"), Err(FormatError::Line(_))));
        assert!(matches!(Format::parse("field:;\toffset:1;\tsize:4;"), Err(FormatError::Line(_))));
        assert_eq!(Format::parse("").unwrap(), Format::default());
    }
}
