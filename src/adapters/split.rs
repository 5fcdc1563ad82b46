//! Splitting a long reply into messages that fit a platform's limit: at paragraph or line
//! boundaries, never inside a code block (a fence that must be split is closed and reopened with
//! its language tag), never inside a character.

/// Discord's limit for one message, in characters.
pub const DISCORD_LIMIT: usize = 2000;

fn chars(s: &str) -> usize {
    s.chars().count()
}

/// The fence opening a code block on this line (` ```rust ` gives "```rust"), if any.
fn fence(line: &str) -> Option<&str> {
    let t = line.trim_start();
    t.starts_with("```").then_some(t.trim_end())
}

/// Cuts a line longer than `limit` into pieces, preferring to break after whitespace.
fn hard_wrap(line: &str, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while chars(rest) > limit {
        let cut_byte = rest
            .char_indices()
            .nth(limit)
            .map_or(rest.len(), |(i, _)| i);
        let head = &rest[..cut_byte];
        let at = head
            .char_indices()
            .rev()
            .find(|(i, c)| c.is_whitespace() && *i > cut_byte / 2)
            .map_or(cut_byte, |(i, c)| i + c.len_utf8());
        out.push(rest[..at].to_string());
        rest = &rest[at..];
    }
    out.push(rest.to_string());
    out
}

/// Splits `text` into pieces of at most `limit` characters each.
pub fn split_message(text: &str, limit: usize) -> Vec<String> {
    if chars(text) <= limit {
        return vec![text.to_string()];
    }
    // Room kept for closing ("\n```") and reopening a fence ("```lang\n") around a split.
    let reserve = 24;
    let budget = limit.saturating_sub(reserve).max(16);
    let mut chunks: Vec<String> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut size = 0usize;
    // The fence of the code block we are inside, if any, and the one the current chunk starts in.
    let mut open: Option<String> = None;
    let mut chunk_opened_in: Option<String> = None;
    // For each line of `current`: the fence open after it (to split at a paragraph boundary).
    let mut open_after: Vec<Option<String>> = Vec::new();

    let flush = |lines: &[String],
                 start_fence: &Option<String>,
                 end_fence: &Option<String>,
                 chunks: &mut Vec<String>| {
        let mut body = String::new();
        if let Some(f) = start_fence {
            body.push_str(f);
            body.push('\n');
        }
        body.push_str(&lines.join("\n"));
        if end_fence.is_some() {
            body.push_str("\n```");
        }
        if !body.trim().is_empty() {
            chunks.push(body);
        }
    };

    let mut pieces: Vec<String> = Vec::new();
    for line in text.split('\n') {
        if chars(line) > budget {
            pieces.extend(hard_wrap(line, budget));
        } else {
            pieces.push(line.to_string());
        }
    }
    for line in pieces {
        let cost = chars(&line) + 1;
        if size + cost > budget && !current.is_empty() {
            // Prefer a paragraph break (a blank line outside code) in the second half.
            let mut cut = current.len();
            let mut acc = 0;
            let mut best = None;
            for (i, l) in current.iter().enumerate() {
                acc += chars(l) + 1;
                if acc > budget / 2 && l.trim().is_empty() && open_after[i].is_none() && i > 0 {
                    best = Some(i);
                }
            }
            if let Some(b) = best {
                cut = b + 1;
            }
            let end_fence = open_after[cut - 1].clone();
            flush(&current[..cut], &chunk_opened_in, &end_fence, &mut chunks);
            let carried: Vec<String> = current[cut..].to_vec();
            let carried_open: Vec<Option<String>> = open_after[cut..].to_vec();
            chunk_opened_in = end_fence;
            current = carried;
            open_after = carried_open;
            size = current.iter().map(|l| chars(l) + 1).sum();
        }
        if let Some(f) = fence(&line) {
            open = match open {
                Some(_) => None,
                None => Some(f.to_string()),
            };
        }
        size += cost;
        current.push(line);
        open_after.push(open.clone());
    }
    if !current.is_empty() {
        flush(&current, &chunk_opened_in, &None, &mut chunks);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(chunks: &[String], limit: usize) {
        for c in chunks {
            assert!(chars(c) <= limit, "{} > {limit}", chars(c));
            assert_eq!(c.matches("```").count() % 2, 0, "unbalanced fence in {c:?}");
        }
    }

    #[test]
    fn short_text_is_one_message() {
        assert_eq!(split_message("hello", 2000), vec!["hello".to_string()]);
    }

    #[test]
    fn paragraphs_and_lines() {
        let para = "word ".repeat(60);
        let text = (0..20)
            .map(|_| para.trim())
            .collect::<Vec<_>>()
            .join("\n\n");
        let chunks = split_message(&text, 2000);
        assert!(chunks.len() >= 2);
        check(&chunks, 2000);
        // Every piece ends at a paragraph: nothing is split mid-paragraph.
        for c in &chunks {
            for p in c.split("\n\n").filter(|p| !p.trim().is_empty()) {
                assert_eq!(p.trim(), para.trim());
            }
        }
        let joined: String = chunks.concat().split_whitespace().collect();
        assert_eq!(joined, text.split_whitespace().collect::<String>());
    }

    #[test]
    fn code_blocks_are_closed_and_reopened_with_their_language() {
        let code: String = (0..200)
            .map(|i| format!("    let x{i} = {i} * 2; // compute\n"))
            .collect();
        let text = format!("Here is code:\n```rust\n{code}```\nDone.");
        let chunks = split_message(&text, 2000);
        assert!(chunks.len() >= 3, "{}", chunks.len());
        check(&chunks, 2000);
        for c in &chunks[1..chunks.len() - 1] {
            assert!(c.starts_with("```rust\n"), "{c:.40}");
        }
        assert!(chunks.last().unwrap().ends_with("Done."));
        let lines: usize = chunks.iter().map(|c| c.matches("// compute").count()).sum();
        assert_eq!(lines, 200);
    }

    #[test]
    fn a_line_with_no_break_is_cut() {
        let text = "x".repeat(5000);
        let chunks = split_message(&text, 2000);
        check(&chunks, 2000);
        assert_eq!(chunks.concat(), text);
    }

    #[test]
    fn multibyte_characters_stay_whole() {
        let text = "日本語🎉".repeat(1500);
        let chunks = split_message(&text, 2000);
        check(&chunks, 2000);
        assert_eq!(chunks.concat(), text);
        let words = "héllo wörld ".repeat(600);
        let chunks = split_message(&words, 2000);
        check(&chunks, 2000);
        assert_eq!(chunks.concat(), words);
    }
}
