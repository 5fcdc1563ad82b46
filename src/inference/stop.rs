//! Stop rules over streamed text: a stop string may arrive split across tokens, so text that
//! could still become one is held back and never shown.

use super::tokenizer::TextTokenizer;

/// Turns generated ids into text pieces that never split a character (byte-fallback tokens
/// of one character arrive together), keeping leading spaces that per-token decoding loses.
///
/// Each step decodes a few already-shown tokens plus the new ones and shows what the new ones
/// add. Bytes that never complete a character (a model may emit any byte token) are shown as
/// U+FFFD once four of them are pending, so they can neither stall nor break the stream.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    /// Recently shown tokens, decoded with the new ones for spacing.
    context: Vec<u32>,
    pending: Vec<u32>,
}

impl TextStream {
    /// Shown tokens kept as context.
    const CONTEXT: usize = 6;
    /// The longest UTF-8 character, in byte tokens.
    const MAX_PENDING: usize = 4;

    pub fn step(&mut self, tok: &TextTokenizer, id: u32) -> Result<Option<String>, String> {
        self.pending.push(id);
        let decode = |ids: &[u32]| tok.decode(ids).map_err(|e| e.to_string());
        let before = decode(&self.context)?;
        let all: Vec<u32> = self.context.iter().chain(&self.pending).copied().collect();
        let text = decode(&all)?;
        if text.ends_with('\u{FFFD}') && self.pending.len() < Self::MAX_PENDING {
            return Ok(None);
        }
        let new = match text.strip_prefix(before.as_str()) {
            Some(rest) => rest.to_string(),
            // Broken bytes at the window's start decode differently with more after them.
            None => decode(&self.pending)?,
        };
        self.context.append(&mut self.pending);
        let keep_from = self.context.len().saturating_sub(Self::CONTEXT);
        self.context.drain(..keep_from);
        Ok((!new.is_empty()).then_some(new))
    }
}

/// Accumulates decoded text and releases what can no longer turn into a stop string.
#[derive(Debug, Clone)]
pub struct StopScanner {
    stops: Vec<String>,
    text: String,
    emitted: usize,
    started: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    /// Text safe to show now (may be empty).
    Emit(String),
    /// A stop string appeared; this is the last text to show.
    Stop(String),
}

impl StopScanner {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            text: String::new(),
            emitted: 0,
            started: false,
        }
    }

    pub fn push(&mut self, piece: &str) -> Scan {
        if !self.started {
            // A reply starts after "ASSISTANT:"; leading blanks are not part of it.
            let trimmed = piece.trim_start();
            if trimmed.is_empty() {
                return Scan::Emit(String::new());
            }
            self.started = true;
            self.text.push_str(trimmed);
        } else {
            self.text.push_str(piece);
        }
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min()
        {
            let out = self.text[self.emitted.min(at)..at].to_string();
            self.text.truncate(at);
            self.emitted = at;
            return Scan::Stop(out);
        }
        // Trailing blanks wait for what follows them, so a reply never ends in them.
        let hold = self.held_back();
        let upto = (self.text.len() - hold).min(self.text.trim_end().len());
        if upto <= self.emitted {
            return Scan::Emit(String::new());
        }
        let out = self.text[self.emitted..upto].to_string();
        self.emitted = upto;
        Scan::Emit(out)
    }

    /// Length of the longest end of the text that begins some stop string.
    fn held_back(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            for len in (1..stop.len()).rev() {
                if len <= best {
                    break;
                }
                if self.text.ends_with(&stop[..len]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }

    /// At the end of generation: whatever was held back and is not a stop after all, without
    /// trailing blanks.
    pub fn finish(&mut self) -> String {
        let end = self.text.trim_end().len().max(self.emitted);
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        self.text.truncate(end);
        out
    }

    /// All text shown so far.
    pub fn text(&self) -> &str {
        &self.text[..self.emitted]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::tokenizer::test_support::llama2 as tokenizer;

    fn stream_all(tok: &TextTokenizer, ids: &[u32]) -> String {
        let mut s = TextStream::default();
        ids.iter()
            .filter_map(|&id| s.step(tok, id).unwrap())
            .collect()
    }

    #[test]
    fn text_stream_equals_whole_decode_and_survives_broken_bytes() {
        let tok = tokenizer();
        // Spaces, newlines and a multi-byte character split over byte tokens.
        let text = "Hello there,\n  the café costs 5€ — naïve 😀 ok";
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(stream_all(&tok, &ids), tok.decode(&ids).unwrap());
        // Byte tokens (<0x00> is id 3) that never form a character, between words, as a random
        // model emits them: never an error, and the words all come through.
        let byte = |b: u32| 3 + b;
        let words = tok.encode("rons site", false).unwrap();
        // A valid byte ("W") then bytes that break it: decoded together, all three become U+FFFD,
        // which once made the stream fail on "W" no longer being a prefix.
        let mut ids = vec![byte(0x57), byte(0xE2), byte(0x82)];
        ids.extend(&words);
        ids.extend([byte(0x41), byte(0xF0), byte(0x9F), byte(0x98)]);
        ids.extend(&words);
        ids.push(byte(0x80));
        let shown = stream_all(&tok, &ids);
        assert_eq!(shown.matches("rons").count(), 2, "{shown:?}");
        assert_eq!(shown.matches("site").count(), 2, "{shown:?}");
    }

    /// The chat's role lines, as the prompt layer passes them.
    fn stops() -> Vec<String> {
        ["\nUSER:", "\nSYSTEM:", "\nASSISTANT:"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn run(pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut s = StopScanner::new(&stops());
        let mut out = Vec::new();
        let mut stopped = false;
        for p in pieces {
            match s.push(p) {
                Scan::Emit(t) => out.push(t),
                Scan::Stop(t) => {
                    out.push(t);
                    stopped = true;
                    break;
                }
            }
        }
        if !stopped {
            out.push(s.finish());
        }
        (out, stopped, s.text().to_string())
    }

    #[test]
    fn stop_split_over_pieces_is_never_shown() {
        let cases: &[(&[&str], &str, bool)] = &[
            (
                &[" Hello", " there", "\n", "US", "ER", ":", " more"],
                "Hello there",
                true,
            ),
            (&["Hi", "\nASS", "ISTANT:"], "Hi", true),
            (&["a\nSYSTEM: x"], "a", true),
            (&["Use", "\nUS", "B", " sticks"], "Use\nUSB sticks", false),
            (&["ok", "\n", "\n"], "ok", false),
            (&["  ", " lead"], "lead", false),
        ];
        for (pieces, want, want_stop) in cases {
            let (deltas, stopped, text) = run(pieces);
            assert_eq!(text, *want, "{pieces:?}");
            assert_eq!(deltas.concat(), *want, "{pieces:?}");
            assert_eq!(stopped, *want_stop, "{pieces:?}");
            for d in &deltas {
                assert!(
                    !d.contains("USER:") && !d.contains("ASSISTANT:") && !d.contains("SYSTEM:"),
                    "{d:?}"
                );
            }
        }
    }

    #[test]
    fn nothing_is_held_without_a_possible_stop() {
        let mut s = StopScanner::new(&stops());
        assert_eq!(s.push("Hello"), Scan::Emit("Hello".into()));
        assert_eq!(s.push(" world\n"), Scan::Emit(" world".into()));
        assert_eq!(s.push("Next"), Scan::Emit("\nNext".into()));
    }
}
