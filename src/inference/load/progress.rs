//! Progress of the long steps of a start (downloading, quantising, loading) that a person can read:
//! a bar on a terminal, and on anything else (a log, a pipe, systemd's journal) a line every few
//! seconds with how much is done, the speed and the time left.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Tensors,
}

/// Seconds between lines when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    label: String,
    unit: Unit,
    total: u64,
    done: u64,
    started: Instant,
    last_line: Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    /// Starts counting toward `total`; a bar when stderr is a terminal, else lines.
    pub fn new(label: impl Into<String>, total: u64, unit: Unit) -> Self {
        let label = label.into();
        let bar = std::io::stderr().is_terminal().then(|| {
            let template = match unit {
                Unit::Bytes => "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, {eta} left",
                Unit::Tensors => "{msg} [{bar:30}] {pos}/{len} tensors, {eta} left",
            };
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(label.clone());
            bar
        });
        if bar.is_none() && total > 0 {
            tracing::info!("{label}: starting, {}", amount(unit, total));
        }
        let now = Instant::now();
        Self {
            label,
            unit,
            total,
            done: 0,
            started: now,
            last_line: now,
            bar,
        }
    }

    /// Counts `n` more done.
    pub fn advance(&mut self, n: u64) {
        self.done += n;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
        } else if self.last_line.elapsed() >= LINE_EVERY {
            self.last_line = Instant::now();
            tracing::info!("{}", self.line());
        }
    }

    /// The line printed when stderr is not a terminal, e.g. `downloading model.safetensors:
    /// 1.2 GiB of 9.9 GiB (12%), 45.3 MiB/s, about 3 min left`.
    pub fn line(&self) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = self.done as f64 / elapsed.max(1e-3);
        let percent = if self.total == 0 {
            100.0
        } else {
            self.done as f64 * 100.0 / self.total as f64
        };
        let left = if rate > 0.0 {
            format!(
                ", about {} left",
                duration_words((self.total.saturating_sub(self.done)) as f64 / rate)
            )
        } else {
            String::new()
        };
        let speed = match self.unit {
            Unit::Bytes => format!("{}/s", bytes_words(rate as u64)),
            Unit::Tensors => format!("{rate:.1} tensors/s"),
        };
        format!(
            "{}: {} of {} ({percent:.0}%), {speed}{left}",
            self.label,
            amount_number(self.unit, self.done),
            amount(self.unit, self.total),
        )
    }

    /// Ends the count with one line saying how long it took.
    pub fn finish(self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        self.log_done();
    }
}

impl Progress {
    fn log_done(&self) {
        tracing::info!(
            "{}: done, {} in {}",
            self.label,
            amount(self.unit, self.done),
            duration_words(self.started.elapsed().as_secs_f64())
        );
    }
}

/// hf-hub reports downloads through this.
impl hf_hub::api::Progress for Progress {
    fn init(&mut self, size: usize, _filename: &str) {
        // Called again when a cut download resumes; the count starts over from `update`.
        self.total = size as u64;
        self.done = 0;
        match &self.bar {
            Some(bar) => bar.set_length(size as u64),
            None => tracing::info!(
                "{}: starting, {}",
                self.label,
                amount(self.unit, self.total)
            ),
        }
    }

    fn update(&mut self, size: usize) {
        self.advance(size as u64);
    }

    fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        self.log_done();
    }
}

fn amount(unit: Unit, n: u64) -> String {
    match unit {
        Unit::Bytes => bytes_words(n),
        Unit::Tensors => format!("{n} tensors"),
    }
}

fn amount_number(unit: Unit, n: u64) -> String {
    match unit {
        Unit::Bytes => bytes_words(n),
        Unit::Tensors => n.to_string(),
    }
}

/// A weight file's name (or a sharded model's folder name) for progress labels.
pub fn file_label(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// `13.5 GB`-style sizes in binary units, as `df -h` shows them.
pub fn bytes_words(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn duration_words(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_as_people_write_them() {
        assert_eq!(bytes_words(512), "512 B");
        assert_eq!(bytes_words(13_476_839_424), "12.6 GiB");
        assert_eq!(bytes_words(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(duration_words(42.4), "42 s");
        assert_eq!(duration_words(185.0), "3 min 5 s");
        assert_eq!(duration_words(7300.0), "2 h 1 min");
    }

    #[test]
    fn a_line_names_the_step_the_amount_the_speed_and_the_time_left() {
        let mut p = Progress {
            label: "downloading model.safetensors".into(),
            unit: Unit::Bytes,
            total: 4 << 30,
            done: 0,
            started: Instant::now() - Duration::from_secs(10),
            last_line: Instant::now(),
            bar: None,
        };
        p.advance(1 << 30);
        let line = p.line();
        assert!(
            line.starts_with("downloading model.safetensors: 1.0 GiB of 4.0 GiB (25%), "),
            "{line}"
        );
        assert!(line.contains("MiB/s, about 30 s left"), "{line}");
    }
}
