//! Process metrics read from `/proc/self` at scrape time (Linux): resident memory, CPU time,
//! open file descriptors, start time. Nothing is sampled in the background.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

#[derive(Debug)]
pub struct ProcessCollector {
    start_unix: f64,
}

impl ProcessCollector {
    pub fn new() -> Self {
        let start_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Self { start_unix }
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self::new()
    }
}

/// Clock ticks per second for `/proc/<pid>/stat` times: 100 on every Linux we run on (the
/// kernel's USER_HZ; reading it needs `sysconf`, i.e. libc, for a constant).
const TICKS: f64 = 100.0;

fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS)
}

/// Resident set size from `/proc/self/status` (`VmRSS`, in kB): the kernel does the page
/// arithmetic, so the value is right on 4K, 16K and 64K-page kernels alike (`/proc/self/statm`
/// counts pages, and its page size would need `sysconf`, i.e. libc and unsafe code).
fn rss_bytes() -> Option<u64> {
    vm_rss_bytes(&std::fs::read_to_string("/proc/self/status").ok()?)
}

fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut f = line.split_whitespace().skip(1);
    let value: u64 = f.next()?.parse().ok()?;
    // The kernel always writes "kB" (meaning KiB); anything else is not a format we know.
    match f.next()? {
        "kB" => value.checked_mul(1024),
        _ => None,
    }
}

fn open_fds() -> Option<i64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as i64)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(cpu) = cpu_seconds() {
            let c = ConstCounter::new(cpu);
            let e = encoder.encode_descriptor(
                "process_cpu",
                "User and system CPU time of the sidecar process",
                Some(&Unit::Seconds),
                c.metric_type(),
            )?;
            c.encode(e)?;
        }
        if let Some(rss) = rss_bytes() {
            let g = ConstGauge::new(rss as i64);
            let e = encoder.encode_descriptor(
                "process_resident_memory",
                "Resident set size of the sidecar process",
                Some(&Unit::Bytes),
                g.metric_type(),
            )?;
            g.encode(e)?;
        }
        if let Some(fds) = open_fds() {
            let g = ConstGauge::new(fds);
            let e = encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors (sockets included)",
                None,
                g.metric_type(),
            )?;
            g.encode(e)?;
        }
        let g = ConstGauge::new(self.start_unix);
        let e = encoder.encode_descriptor(
            "process_start_time",
            "When the sidecar's data plane started, Unix time",
            Some(&Unit::Seconds),
            g.metric_type(),
        )?;
        g.encode(e)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_comes_from_vm_rss_in_kib() {
        let status = "Name:\tmesh-agent\nVmPeak:\t  20000 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(vm_rss_bytes(status), Some(12345 * 1024));
        assert_eq!(vm_rss_bytes("VmRSS:\t12 pages\n"), None);
        assert_eq!(vm_rss_bytes("Name:\tx\n"), None);
    }

    #[test]
    fn rss_of_this_process_is_read() {
        let rss = rss_bytes().expect("VmRSS on Linux");
        assert!(rss > 1 << 20 && rss.is_multiple_of(1024), "{rss}");
    }
}
