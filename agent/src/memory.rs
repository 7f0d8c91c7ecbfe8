//! Giving the kernel back what a long idle wait does not need.
//!
//! The revoke-only guard (`sidekey-agent guard`) sleeps from the pod's start to its stop. What it
//! touched while starting (argument parsing, config decoding, the runtime) stays mapped: about
//! 3.5 MiB of the binary's pages counted in its RSS, for code it will not run again until SIGTERM.
//! [`release_code_pages`] asks the kernel to page those out (`MADV_PAGEOUT`, Linux 5.4+). They are
//! clean file pages, so nothing is written anywhere: the kernel drops them, and the few the
//! revocation needs are read back from the image when the pod stops.

use std::io;

/// One mapping of the executable, from `/proc/self/maps`.
#[derive(Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: usize,
    pub end: usize,
}

/// The mappings of `exe` in a `/proc/<pid>/maps` text: lines whose path is the executable.
pub fn exe_mappings(maps: &str, exe: &str) -> Vec<Mapping> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let path = fields.nth(4)?;
            if path != exe {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some(Mapping {
                start: usize::from_str_radix(start, 16).ok()?,
                end: usize::from_str_radix(end, 16).ok()?,
            })
        })
        .filter(|m| m.end > m.start)
        .collect()
}

/// Pages out every mapping of the running executable. Returns how many bytes were advised; an
/// error means the kernel refused (an old kernel, say), which costs memory and nothing else.
pub fn release_code_pages() -> io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut advised = 0;
    for m in exe_mappings(&maps, &exe.to_string_lossy()) {
        let len = m.end - m.start;
        // SAFETY: the range is one of our own mappings as the kernel listed it; MADV_PAGEOUT only
        // drops pages (clean file pages are read back on the next touch), it changes no contents.
        let rc = unsafe { libc::madvise(m.start as *mut libc::c_void, len, libc::MADV_PAGEOUT) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        advised += len;
    }
    Ok(advised)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
555582b80000-555582c00000 r--p 00000000 00:2a 123 /usr/local/bin/sidekey-agent
555582c00000-555583000000 r-xp 00080000 00:2a 123 /usr/local/bin/sidekey-agent
555583000000-555583001000 rw-p 00000000 00:00 0
555583100000-555583200000 rw-p 00000000 00:00 0                          [heap]
7ffe4fb48000-7ffe4fb69000 rw-p 00000000 00:00 0                          [stack]
7f0000000000-7f0000001000 r--p 00000000 00:2a 124 /usr/local/bin/sidekey-agent-old
";

    #[test]
    fn only_the_executables_own_mappings_are_picked() {
        assert_eq!(
            exe_mappings(MAPS, "/usr/local/bin/sidekey-agent"),
            vec![
                Mapping {
                    start: 0x555582b80000,
                    end: 0x555582c00000
                },
                Mapping {
                    start: 0x555582c00000,
                    end: 0x555583000000
                },
            ]
        );
        assert!(exe_mappings(MAPS, "/bin/other").is_empty());
    }

    #[test]
    fn paging_out_our_code_keeps_the_process_running_and_shrinks_its_file_rss() {
        let file_rss = || {
            std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("RssFile:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
                .unwrap()
        };
        let before = file_rss();
        let advised = release_code_pages().expect("madvise(MADV_PAGEOUT) on our own code");
        assert!(advised > 0, "no mapping of the test binary was found");
        // Code keeps running after its pages were dropped: they fault back in from the file.
        let after = file_rss();
        assert!(
            after < before,
            "file-backed RSS did not shrink: {before} kB before, {after} kB after"
        );
    }
}
