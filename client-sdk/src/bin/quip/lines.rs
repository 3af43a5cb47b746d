//! `quip send` with standard input: every line is one message, and every line's outcome is
//! told: its seq on stdout once stored, or its number and the reason on stderr.

use std::io::{self, BufRead};

/// One line of input: its number (from 1, empty lines counted) and its text, or why it cannot
/// be a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub number: u64,
    pub text: Result<String, String>,
}

/// Hands each line of `input` to `each`, until the input ends or `each` returns false. A line
/// ends at `\n` (a `\r` before it goes too); empty lines are skipped. A line that is not UTF-8
/// comes with the reason instead of a text, so that the lines after it still go.
pub fn read_lines(mut input: impl BufRead, mut each: impl FnMut(Line) -> bool) -> io::Result<()> {
    let mut number = 0;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if input.read_until(b'\n', &mut buf)? == 0 {
            return Ok(());
        }
        number += 1;
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        }
        if buf.is_empty() {
            continue;
        }
        let text = String::from_utf8(std::mem::take(&mut buf)).map_err(|e| {
            format!(
                "not valid UTF-8 (at byte {} of the line); not sent",
                e.utf8_error().valid_up_to() + 1
            )
        });
        if !each(Line { number, text }) {
            return Ok(());
        }
    }
}

/// The lines that were not stored, for stderr. Consecutive failures for the same reason make
/// one report (`lines 57 to 400: ...`), so that a server that gives out does not bury the seqs
/// under a line per message.
#[derive(Debug, Default)]
pub struct Failures {
    run: Option<(u64, u64, String)>,
    /// Lines that failed so far.
    pub count: u64,
}

impl Failures {
    /// Line `number` failed; a report, if this ends the run of an earlier reason.
    pub fn failed(&mut self, number: u64, reason: String) -> Option<String> {
        self.count += 1;
        match &mut self.run {
            Some((_, last, same)) if *same == reason => {
                *last = number;
                None
            }
            run => run.replace((number, number, reason)).map(report),
        }
    }

    /// A line was stored: the report of the failures before it, if any.
    pub fn stored(&mut self) -> Option<String> {
        self.run.take().map(report)
    }

    /// The input is done: the last report, if any.
    pub fn finish(&mut self) -> Option<String> {
        self.run.take().map(report)
    }
}

fn report((first, last, reason): (u64, u64, String)) -> String {
    if first == last {
        format!("line {first}: {reason}")
    } else {
        format!("lines {first} to {last}: {reason}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<Line> {
        let mut all = Vec::new();
        read_lines(input, |line| {
            all.push(line);
            true
        })
        .unwrap();
        all
    }

    #[test]
    fn lines_are_numbered_as_in_the_input_and_bad_utf8_names_its_line() {
        let all = lines(b"good1\n\xff\xfebad\n\ngood2\r\nlast");
        let numbers: Vec<u64> = all.iter().map(|l| l.number).collect();
        assert_eq!(
            numbers,
            [1, 2, 4, 5],
            "the empty line 3 is skipped, not renumbered"
        );
        assert_eq!(all[0].text, Ok("good1".into()));
        assert!(all[1]
            .text
            .as_ref()
            .unwrap_err()
            .contains("not valid UTF-8"));
        assert_eq!(all[2].text, Ok("good2".into()), "CRLF line ends");
        assert_eq!(
            all[3].text,
            Ok("last".into()),
            "a last line without a line end"
        );
    }

    #[test]
    fn reading_stops_when_asked() {
        let mut seen = 0;
        read_lines(&b"a\nb\nc\n"[..], |_| {
            seen += 1;
            seen < 2
        })
        .unwrap();
        assert_eq!(seen, 2);
    }

    #[test]
    fn consecutive_failures_for_one_reason_are_one_report() {
        let mut failures = Failures::default();
        assert_eq!(failures.failed(2, "too large".into()), None);
        assert_eq!(failures.stored(), Some("line 2: too large".into()));
        assert_eq!(failures.stored(), None);
        assert_eq!(failures.failed(5, "gave up".into()), None);
        assert_eq!(failures.failed(6, "gave up".into()), None);
        assert_eq!(
            failures.failed(7, "bad".into()),
            Some("lines 5 to 6: gave up".into())
        );
        assert_eq!(failures.finish(), Some("line 7: bad".into()));
        assert_eq!(failures.count, 4);
    }
}
