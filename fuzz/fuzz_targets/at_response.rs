//! AT response codec and answer parsers over arbitrary bytes: the decoder
//! never panics, stays within its bounds, gives the same events whether
//! the input arrives whole or split, and every line it produces goes
//! through every telemetry parser without a panic.
#![no_main]

use edge_agent::rotate::at::codec::{
    Decoder, Event, MAX_LINE, MAX_RESPONSE_BYTES, MAX_RESPONSE_LINES,
};
use edge_agent::rotate::at::telemetry::{self, Parser, SinrScale};
use libfuzzer_sys::fuzz_target;
use shared::wire::Telemetry;

const COMMANDS: &[&str] = &[
    "AT+CSQ",
    "ATI",
    "AT+CGMM",
    "AT+CREG?",
    "AT+CEREG?",
    "AT+COPS?",
    "AT+CGPADDR=1",
    "AT+QENG=\"servingcell\"",
    "AT+QNWINFO",
    "AT+CPSI?",
];

fuzz_target!(|data: &[u8]| {
    // First byte: the command in flight and where to split the input.
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let command = COMMANDS[sel as usize % COMMANDS.len()];
    let cut = if input.is_empty() {
        0
    } else {
        (sel as usize * 7919) % (input.len() + 1)
    };

    let whole = decode(command, &[input]);
    let split = decode(command, &[&input[..cut], &input[cut..]]);
    assert_eq!(whole, split, "splitting the input changed the result");

    let mut t = Telemetry::default();
    for ev in &whole {
        let lines: Vec<String> = match ev {
            Event::Response(r) => {
                assert!(r.lines.len() <= MAX_RESPONSE_LINES);
                assert!(r.lines.iter().map(String::len).sum::<usize>() <= MAX_RESPONSE_BYTES);
                r.lines.clone()
            }
            Event::Unsolicited(u) => {
                assert!(u.len() <= 3 * MAX_LINE);
                vec![u.clone()]
            }
            Event::Stray(_) | Event::Overlong => continue,
        };
        for parser in [
            Parser::Csq,
            Parser::Cops,
            Parser::Registration,
            Parser::Qnwinfo,
            Parser::Qeng,
            Parser::Cpsi,
        ] {
            telemetry::apply(&mut t, parser, &lines, SinrScale::FifthDb);
        }
        for line in &lines {
            let _ = telemetry::parse_cgpaddr(line);
            let _ = telemetry::parse_cgact(line);
        }
    }
});

fn decode(command: &str, chunks: &[&[u8]]) -> Vec<Event> {
    let mut d = Decoder::new();
    d.begin(command);
    let mut events = Vec::new();
    for chunk in chunks {
        d.feed(chunk, &mut events);
        assert!(d.buffered() <= MAX_LINE + MAX_RESPONSE_BYTES);
    }
    events
}
