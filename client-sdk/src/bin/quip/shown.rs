//! Text from other people, made safe for a terminal.
//!
//! Message texts, titles, reactions and error messages come from other members (or the server)
//! and are printed in lines and tab-separated columns. Printed raw, a line break in a message
//! would start a line that looks like another message, a tab would shift the columns of
//! `conv list`, and an escape sequence would drive the terminal. [`Shown`] prints such
//! characters escaped instead (`\n`, `\t`, `\u{1b}`), and everything else as it is: letters of
//! every script, emoji with their joiners and variation selectors. `--json` output needs none of
//! this: JSON escapes control characters itself.

use std::fmt::{self, Write};

/// Displays a string with control characters and other invisible formatting characters
/// escaped.
#[derive(Debug, Clone, Copy)]
pub struct Shown<'a>(pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if hidden(c) => write!(f, "\\u{{{:x}}}", u32::from(c))?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Characters that do not print as themselves: the C0 and C1 controls and DEL (line breaks,
/// tabs, escapes, BEL), the bidirectional controls (which can make text read in another order
/// than it is stored), the line and paragraph separators, the byte order mark and the
/// interlinear annotation marks. Joiners (U+200C, U+200D) are not among them: scripts and emoji
/// need them.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(s: &str) -> String {
        Shown(s).to_string()
    }

    #[test]
    fn a_message_cannot_forge_a_line_or_a_column() {
        assert_eq!(
            shown("hello\n33 alice: I owe bob $100"),
            "hello\\n33 alice: I owe bob $100"
        );
        assert_eq!(shown("a\r\nb\tc"), "a\\r\\nb\\tc");
        assert!(!shown("x\u{2028}y\u{85}z").contains(['\u{2028}', '\u{85}']));
    }

    #[test]
    fn terminal_escapes_and_bidi_controls_are_shown_not_obeyed() {
        assert_eq!(shown("\u{1b}[31mred\u{7}"), "\\u{1b}[31mred\\u{7}");
        assert_eq!(
            shown("\u{9b}2J"),
            "\\u{9b}2J",
            "the C1 control sequence introducer"
        );
        assert_eq!(shown("\u{7f}"), "\\u{7f}");
        assert_eq!(shown("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(shown("\u{2067}x\u{2069}"), "\\u{2067}x\\u{2069}");
        assert_eq!(shown("\u{feff}bom"), "\\u{feff}bom");
    }

    #[test]
    fn every_script_and_emoji_sequence_prints_as_it_is() {
        for text in [
            "שלום 👋",
            "مرحبا",
            "می‌خواهم",
            "こんにちは",
            "👨\u{200d}👩\u{200d}👧",
            "❤\u{fe0f}",
            "🏴\u{e0067}\u{e0062}\u{e0065}\u{e006e}\u{e0067}\u{e007f}",
            "back\\slash and \"quotes\"",
        ] {
            assert_eq!(shown(text), text);
        }
    }
}
