//! Just enough ELF64 reading to find a kernel's notes (the PVH entry note in particular).

/// Xen's note type for the 32-bit PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY).
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// One ELF note: its owner name, type and descriptor bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub name: String,
    pub kind: u32,
    pub desc: Vec<u8>,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Every note in the PT_NOTE segments of a little-endian ELF64 image, or `None` if the image is
/// not one (or is truncated).
pub fn notes(image: &[u8]) -> Option<Vec<Note>> {
    if image.get(0..4)? != b"\x7fELF" || *image.get(4)? != 2 || *image.get(5)? != 1 {
        return None;
    }
    let phoff = usize::try_from(u64_at(image, 0x20)?).ok()?;
    let phentsize = usize::from(u16_at(image, 0x36)?);
    let phnum = usize::from(u16_at(image, 0x38)?);
    let mut out = Vec::new();
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        const PT_NOTE: u32 = 4;
        if u32_at(image, ph)? != PT_NOTE {
            continue;
        }
        let start = usize::try_from(u64_at(image, ph + 0x08)?).ok()?;
        let size = usize::try_from(u64_at(image, ph + 0x20)?).ok()?;
        let seg = image.get(start..start.checked_add(size)?)?;
        let mut off = 0;
        while off + 12 <= seg.len() {
            let namesz = u32_at(seg, off)? as usize;
            let descsz = u32_at(seg, off + 4)? as usize;
            let kind = u32_at(seg, off + 8)?;
            let name_start = off + 12;
            let desc_start = name_start + namesz.next_multiple_of(4);
            let next = desc_start + descsz.next_multiple_of(4);
            let name = seg.get(name_start..name_start + namesz)?;
            let name = String::from_utf8_lossy(name.strip_suffix(b"\0").unwrap_or(name));
            out.push(Note {
                name: name.into_owned(),
                kind,
                desc: seg.get(desc_start..desc_start + descsz)?.to_vec(),
            });
            off = next;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_is_not_elf64() {
        assert_eq!(notes(b"not an elf"), None);
        assert_eq!(notes(b"\x7fELF\x01\x01"), None);
        assert_eq!(notes(&[]), None);
    }

    #[test]
    fn reads_the_notes_of_this_test_binary() {
        // Every binary the Rust toolchain links on Linux carries a GNU build-id or ABI note.
        let me = std::fs::read(std::env::current_exe().expect("own path")).expect("readable");
        let notes = notes(&me).expect("an ELF64 image");
        assert!(notes.iter().any(|n| n.name == "GNU"), "notes: {notes:?}");
    }
}
