//! The inside of a transform worker process (`userpilot-heap-relay transform-worker`, a hidden
//! subcommand of the relay's own binary): compile the generation's programs once, then answer
//! jobs until the relay closes the pipe. It reads no configuration and no environment (the
//! relay starts it with an empty one), writes nothing but replies, and runs each job on a
//! thread with a large stack, so a legitimate deep recursion fits; what does not fit aborts
//! this process only, and the relay reports `transform_error` and starts another.
//!
//! Protocol (a frame is a u32 little-endian length, then that many bytes):
//! - relay -> worker: one frame, the programs as a JSON array of strings; worker -> relay:
//!   [`MAGIC`], then a reply.
//! - relay -> worker, per job: one frame, the program's index (u32 LE) then the payload's
//!   bytes as verified; worker -> relay: a reply.
//! - A reply is a status byte then a frame: [`OK`] (the outputs as one JSON array),
//!   [`RUN_ERROR`] (error text), [`NOT_AN_OBJECT`] (the payload is not a JSON object).

use std::io::{self, Read, Write};

use super::{Program, compile, run_bytes};

/// Written before the first reply, so the relay can skip anything a test harness printed.
pub const MAGIC: &[u8] = b"\0relay-transform-worker-1\n";
pub const OK: u8 = 0;
pub const RUN_ERROR: u8 = 1;
pub const NOT_AN_OBJECT: u8 = 2;

/// The stack of the thread that runs programs: `def f($n): ... f($n-1)` to a depth of about
/// 30 000 fits (8 MB holds only about 4 000 in a release build).
const STACK_BYTES: usize = 64 << 20;

/// The address space a worker may use, so a program that allocates without bound
/// (`"x" * 1e9`, `[range(1e9)]`) fails alone, fast, instead of pushing the host into swap.
pub const MEMORY_LIMIT_BYTES: u64 = 1 << 30;

/// The worker's `main`: returns when the relay closes standard input.
pub fn main() -> io::Result<()> {
    // Best effort: without the limit the 100 ms deadline still bounds a run.
    let _ = rlimit::setrlimit(rlimit::Resource::AS, MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES);
    let runner = std::thread::Builder::new()
        .name("transform".into())
        .stack_size(STACK_BYTES)
        .spawn(|| serve(&mut io::stdin().lock(), &mut io::stdout().lock()))?;
    runner
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("transform thread panicked")))
}

/// Answers on `output` what `input` asks, until `input` ends.
pub fn serve(input: &mut impl Read, output: &mut impl Write) -> io::Result<()> {
    let mut output = io::BufWriter::new(output);
    let Some(programs) = read_frame(input)? else {
        return Ok(());
    };
    output.write_all(MAGIC)?;
    let programs: Vec<Program> = match serde_json::from_slice::<Vec<String>>(&programs) {
        Ok(codes) => match codes.iter().map(|code| compile(code)).collect() {
            Ok(programs) => programs,
            Err(error) => return reply(&mut output, RUN_ERROR, error.to_string().as_bytes()),
        },
        Err(error) => return reply(&mut output, RUN_ERROR, error.to_string().as_bytes()),
    };
    reply(&mut output, OK, b"")?;
    while let Some(job) = read_frame(input)? {
        let (slot, payload) = match job.split_first_chunk::<4>() {
            Some((slot, payload)) => (u32::from_le_bytes(*slot) as usize, payload),
            None => (usize::MAX, &job[..]),
        };
        let Some(program) = programs.get(slot) else {
            reply(&mut output, RUN_ERROR, b"no such program in this worker")?;
            continue;
        };
        match run_bytes(program, payload) {
            Ok(Ok(outputs)) => reply(&mut output, OK, &outputs)?,
            Ok(Err(error)) => reply(&mut output, RUN_ERROR, error.to_string().as_bytes())?,
            Err(not_an_object) => reply(
                &mut output,
                NOT_AN_OBJECT,
                not_an_object.to_string().as_bytes(),
            )?,
        }
    }
    Ok(())
}

fn reply(output: &mut impl Write, status: u8, body: &[u8]) -> io::Result<()> {
    output.write_all(&[status])?;
    write_frame(output, body)?;
    output.flush()
}

/// One frame; `None` at a clean end of input.
pub fn read_frame(input: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
    input.read_exact(&mut buf)?;
    Ok(Some(buf))
}

pub fn write_frame(output: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(io::Error::other)?;
    output.write_all(&len.to_le_bytes())?;
    output.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(slot: u32, payload: &[u8]) -> Vec<u8> {
        let mut frame = slot.to_le_bytes().to_vec();
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn a_worker_compiles_once_and_answers_each_job_by_program() {
        let mut input = Vec::new();
        write_frame(&mut input, br#"["{a: .x}", "error(\"no\")"]"#).unwrap();
        write_frame(&mut input, &job(0, br#"{"x": 1}"#)).unwrap();
        write_frame(&mut input, &job(1, br#"{"x": 1}"#)).unwrap();
        write_frame(&mut input, &job(0, b"[]")).unwrap();
        let mut output = Vec::new();
        serve(&mut input.as_slice(), &mut output).unwrap();
        let mut rest = output.strip_prefix(MAGIC).unwrap();
        let mut replies = Vec::new();
        while let Some((&status, tail)) = rest.split_first() {
            rest = tail;
            let body = read_frame(&mut rest).unwrap().unwrap();
            replies.push((status, String::from_utf8(body).unwrap()));
        }
        assert_eq!(
            replies,
            [
                (OK, String::new()),
                (OK, r#"[{"a":1}]"#.to_owned()),
                (RUN_ERROR, "jq error: no".to_owned()),
                (NOT_AN_OBJECT, "the payload is not a JSON object".to_owned()),
            ]
        );
    }
}
