//! The terminal side of `peersync status --watch`: polls the node, draws each frame of
//! [`crate::watch::render`] over the last, and gives the terminal back (cursor shown) however it ends.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use peersync::api::client::Client;
use reqwest::Method;

use crate::watch::{render, Sample, Size};

/// Longest wait for one status in the live view; then it shows the error and polls again.
const WATCH_POLL_TIMEOUT: Duration = Duration::from_secs(5);

/// `peersync status --watch`: polls the status and redraws the view over the last one until Ctrl-C
/// or SIGTERM. An unreachable node shows in the view and is polled again; it never ends the watch.
pub async fn run(client: &Client, api: &str, interval: Duration) -> anyhow::Result<()> {
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _cursor = HiddenCursor::new()?;
    let stop = crate::shutdown_signal();
    tokio::pin!(stop);
    let mut sample: Option<Sample> = None;
    loop {
        let poll = async {
            let body = tokio::time::timeout(WATCH_POLL_TIMEOUT, client.call(Method::GET, "/v1/status", None))
                .await
                .map_err(|_| format!("no answer within {} s", WATCH_POLL_TIMEOUT.as_secs()))?
                .map_err(|e| e.to_string())?;
            serde_json::from_slice::<serde_json::Value>(&body).map_err(|e| format!("not a status: {e}"))
        };
        let status = tokio::select! {
            status = poll => status,
            _ = &mut stop => return Ok(()),
        };
        let (text, next) = render(
            status.as_ref().map_err(String::as_str),
            api,
            sample.as_ref(),
            std::time::Instant::now(),
            terminal_size(),
            color,
        );
        sample = Some(next);
        // Home, each line over the old one (clearing what it leaves), then the rest of the screen.
        let mut out = std::io::stdout().lock();
        // No newline after the last line: on the terminal's last row it would scroll the frame.
        out.write_all(b"\x1b[H")?;
        out.write_all(text.trim_end_matches('\n').replace('\n', "\x1b[K\n").as_bytes())?;
        out.write_all(b"\x1b[K\x1b[J")?;
        out.flush()?;
        drop(out);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = &mut stop => return Ok(()),
        }
    }
}

/// Clears the screen and hides the cursor; shows it again when dropped, whatever ends the watch.
struct HiddenCursor;

impl HiddenCursor {
    fn new() -> std::io::Result<HiddenCursor> {
        let mut out = std::io::stdout().lock();
        out.write_all(b"\x1b[2J\x1b[H\x1b[?25l")?;
        out.flush()?;
        Ok(HiddenCursor)
    }
}

impl Drop for HiddenCursor {
    fn drop(&mut self) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(b"\x1b[?25h\n");
        let _ = out.flush();
    }
}

/// The terminal's size: `COLUMNS` and `LINES` when set, else what the terminal says, else 100x40.
fn terminal_size() -> Size {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok()).filter(|n| *n > 0);
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct it is given, and fails on a non-terminal.
    let asked = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    let (cols, rows) = if asked { (ws.ws_col as usize, ws.ws_row as usize) } else { (0, 0) };
    Size {
        cols: env("COLUMNS").or((cols > 0).then_some(cols)).unwrap_or(100),
        rows: env("LINES").or((rows > 0).then_some(rows)).unwrap_or(40),
    }
}
