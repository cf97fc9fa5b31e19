//! `wgpt plot`: train and val loss against step (or tokens) for one or several runs, drawn with
//! plotters into a PNG, and `write_loss_png`, which draws a `--out` directory's `main.log` into
//! its `loss.png`. The point is to see runs side by side (fp16 following fp32, a resumed run
//! following the straight one).
//!
//! Inputs: wgpt's `--log-json` files (step lines `{"step", "train_loss", "tokens", ...}`, val lines
//! `{"step", "val_loss"}`, anything else skipped), llm.c-style `main.log` (`s:N trl:X ...`,
//! `s:N tel:X`, other `s:N key:value` lines skipped) and directories holding a `main.log`. Every
//! failure is one line naming the file (and line); the PNG is written atomically, or not at all.

use crate::error::{Error, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The font every plot's text is drawn in, embedded so plotting needs no system font library
/// (licence: assets/fonts/LICENSE-DejaVu.txt).
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// The colour of run `i` is `PALETTE[i % PALETTE.len()]` (matplotlib's tab10): its train line, val
/// line, val markers and legend entry.
pub const PALETTE: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XAxis {
    /// the optimiser step
    Step,
    /// tokens processed so far (step × tokens per step; --log-json inputs only)
    Tokens,
}

#[derive(Clone, Debug, clap::Args)]
#[command(after_help = "Each input is one run, in its own colour: its train loss as a line, its val loss as a line \
with dots. Inputs: `wgpt train --log-json` files, llm.c-style main.log files (`s:N trl:X`, `s:N tel:X`, as \
`wgpt train --out DIR` and llm.c write them) and --out directories holding a main.log. A run resumed into the same \
log replaces the steps it repeats. `wgpt train --out DIR` also draws DIR/loss.png at every checkpoint.")]
pub struct PlotArgs {
    /// loss logs, one run each: --log-json files, main.log files, or directories holding a main.log
    #[arg(required = true, value_name = "LOG")]
    pub inputs: Vec<PathBuf>,
    /// the PNG to write (atomically: a temporary file renamed into place)
    #[arg(long, default_value = "loss.png")]
    pub out: PathBuf,
    /// x axis: step, or tokens (processed so far; needs --log-json inputs, main.log has no token counts)
    #[arg(long, value_enum, default_value_t = XAxis::Step)]
    pub x: XAxis,
    /// title above the plot
    #[arg(long, default_value = "loss")]
    pub title: String,
    /// image width in pixels (200..=8192)
    #[arg(long, default_value_t = 1024)]
    pub width: u32,
    /// image height in pixels (150..=8192)
    #[arg(long, default_value_t = 640)]
    pub height: u32,
}

/// (x, loss) points in x order.
pub type Points = Vec<(f64, f64)>;

/// One run's curves, as (x, loss) points in x order.
#[derive(Clone, Debug)]
pub struct Run {
    /// the legend entry: the file's name (the directory's for a main.log)
    pub label: String,
    pub path: PathBuf,
    pub train: Points,
    pub val: Points,
}

/// What `plot` drew.
#[derive(Clone, Debug)]
pub struct PlotSummary {
    pub out: PathBuf,
    /// per run: (label, train points, val points)
    pub runs: Vec<(String, usize, usize)>,
}

/// `wgpt plot`: read every input, draw them into one PNG at `a.out`.
pub fn plot(a: &PlotArgs) -> Result<PlotSummary> {
    check_size(a.width, a.height)?;
    let mut runs = a.inputs.iter().map(|p| read_run(p, a.x)).collect::<Result<Vec<_>>>()?;
    disambiguate_labels(&mut runs);
    let png = render(&runs, a.x, &a.title, a.width, a.height)?;
    crate::atomic::write_atomic(&a.out, &png)?;
    Ok(PlotSummary { out: a.out.clone(), runs: runs.iter().map(|r| (r.label.clone(), r.train.len(), r.val.len())).collect() })
}

/// Draw `dir/main.log` (a `wgpt train --out` directory) into `dir/loss.png`, atomically.
pub fn write_loss_png(dir: &Path) -> Result<()> {
    let run = read_run(&dir.join("main.log"), XAxis::Step)?;
    let title = format!("loss: {}", dir_name(dir));
    let png = render(std::slice::from_ref(&run), XAxis::Step, &title, 1024, 640)?;
    crate::atomic::write_atomic(&dir.join("loss.png"), &png)
}

fn check_size(width: u32, height: u32) -> Result<()> {
    if !(200..=8192).contains(&width) {
        return Err(Error::flag("--width", format!("{width} is outside 200..=8192")));
    }
    if !(150..=8192).contains(&height) {
        return Err(Error::flag("--height", format!("{height} is outside 150..=8192")));
    }
    Ok(())
}

fn dir_name(dir: &Path) -> String {
    let named = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    named(dir).or_else(|| std::fs::canonicalize(dir).ok().as_deref().and_then(named)).unwrap_or_else(|| dir.display().to_string())
}

/// Two inputs with the same name (`a/log.jsonl`, `b/log.jsonl`) are labelled by their paths.
fn disambiguate_labels(runs: &mut [Run]) {
    let labels: Vec<String> = runs.iter().map(|r| r.label.clone()).collect();
    for r in runs.iter_mut() {
        if labels.iter().filter(|l| **l == r.label).count() > 1 {
            r.label = r.path.display().to_string();
        }
    }
}

/// Read one run: a `--log-json` file, a main.log, or a directory holding a main.log. The format
/// is told by the first non-blank line (`{` starts JSON).
pub fn read_run(input: &Path, x: XAxis) -> Result<Run> {
    let (path, dir_label) = if input.is_dir() { (input.join("main.log"), Some(dir_name(input))) } else { (input.to_path_buf(), None) };
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let first = text.lines().map(str::trim).find(|l| !l.is_empty());
    if first.is_none() {
        return Err(Error::format(&path, "empty: no loss lines"));
    }
    let json = first.is_some_and(|l| l.starts_with('{'));
    let label = match dir_label {
        Some(l) => l,
        // a main.log is named by its directory
        None if !json => path.parent().filter(|p| !p.as_os_str().is_empty()).map_or_else(|| dir_name(Path::new(".")), dir_name),
        None => path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned()),
    };
    let (train, val) = if json { parse_json_log(&path, &text, x)? } else { parse_main_log(&path, &text, x)? };
    if train.is_empty() && val.is_empty() {
        let what = if json { "no loss lines (JSON lines with \"train_loss\" or \"val_loss\")" } else { "no loss lines (`s:N trl:X` or `s:N tel:X`)" };
        return Err(Error::format(&path, what));
    }
    Ok(Run { label, path, train, val })
}

/// Points keyed by step; a step at or before the last one (a run resumed into the same log)
/// replaces the points from that step on.
#[derive(Default)]
struct Series(Vec<(u64, f64)>);
impl Series {
    fn push(&mut self, step: u64, loss: Option<f64>) {
        let keep = self.0.partition_point(|&(s, _)| s < step);
        self.0.truncate(keep);
        // a non-finite loss (JSON null: a diverged run) leaves a gap, not a point
        if let Some(l) = loss.filter(|l| l.is_finite()) {
            self.0.push((step, l));
        }
    }
}

fn parse_json_log(path: &Path, text: &str, x: XAxis) -> Result<(Points, Points)> {
    let bad = |n: usize, msg: String| Error::format(path, format!("line {n}: {msg}"));
    let mut train = Series::default();
    let mut val = Series::default();
    // tokens at each train step, for the val points under --x tokens
    let mut tokens: Vec<(u64, f64)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            // serde's own "at line 1 column C" would contradict the file's line number
            let msg = e.to_string();
            let msg = msg.rsplit_once(" at line ").map_or(msg.as_str(), |(m, _)| m).to_string();
            bad(n, format!("not a JSON line ({msg}, column {})", e.column()))
        })?;
        let obj = v.as_object().ok_or_else(|| bad(n, "not a JSON object".into()))?;
        let loss_of = |key: &str| -> Result<Option<Option<f64>>> {
            match obj.get(key) {
                None => Ok(None),
                Some(serde_json::Value::Null) => Ok(Some(None)),
                Some(l) => l.as_f64().map(|l| Some(Some(l))).ok_or_else(|| bad(n, format!("\"{key}\" is not a number: {l}"))),
            }
        };
        let (tl, vl) = (loss_of("train_loss")?, loss_of("val_loss")?);
        if tl.is_none() && vl.is_none() {
            continue;
        }
        let step = obj.get("step").and_then(|s| s.as_u64()).ok_or_else(|| bad(n, "a loss line without a \"step\" (a whole number)".into()))?;
        if let Some(l) = tl {
            if x == XAxis::Tokens {
                let t = obj.get("tokens").and_then(|t| t.as_f64()).ok_or_else(|| {
                    bad(n, "no \"tokens\" field for --x tokens (written by newer wgpt train --log-json); plot with --x step".into())
                })?;
                let keep = tokens.partition_point(|&(s, _)| s < step);
                tokens.truncate(keep);
                tokens.push((step, t));
            }
            train.push(step, l);
        }
        if let Some(l) = vl {
            val.push(step, l);
        }
    }
    let train_pts: Points;
    let val_pts: Points;
    match x {
        XAxis::Step => {
            train_pts = train.0.iter().map(|&(s, l)| (s as f64, l)).collect();
            val_pts = val.0.iter().map(|&(s, l)| (s as f64, l)).collect();
        }
        XAxis::Tokens => {
            let tok: std::collections::HashMap<u64, f64> = tokens.iter().copied().collect();
            train_pts = train.0.iter().map(|&(s, l)| (tok[&s], l)).collect();
            // a val line has no token count: the step's (after `step` steps), from the step lines'
            // tokens per step
            let per_step = tokens.iter().rev().find(|&&(s, _)| s > 0).map(|&(s, t)| t / s as f64);
            val_pts = match per_step {
                Some(p) => val.0.iter().map(|&(s, l)| (s as f64 * p, l)).collect(),
                None if val.0.is_empty() => Vec::new(),
                None => {
                    return Err(Error::format(
                        path,
                        "val losses but no step line with \"tokens\" to place them by for --x tokens; plot with --x step",
                    ))
                }
            };
        }
    }
    Ok((train_pts, val_pts))
}

fn parse_main_log(path: &Path, text: &str, x: XAxis) -> Result<(Points, Points)> {
    if x == XAxis::Tokens {
        return Err(Error::format(path, "a main.log has no token counts: --x tokens needs a --log-json file (or plot with --x step)"));
    }
    let bad = |n: usize, msg: String| Error::format(path, format!("line {n}: {msg}"));
    let mut train = Series::default();
    let mut val = Series::default();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        let step = first
            .strip_prefix("s:")
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| bad(n, format!("expected `s:STEP key:value ...`, found {:?}", truncate(line))))?;
        for f in fields {
            let (key, value) = f.split_once(':').ok_or_else(|| bad(n, format!("expected key:value, found {:?}", truncate(f))))?;
            let series = match key {
                "trl" => &mut train,
                "tel" => &mut val,
                _ => continue,
            };
            let l: f64 = value.parse().map_err(|_| bad(n, format!("{key}: {:?} is not a number", truncate(value))))?;
            series.push(step, Some(l));
        }
    }
    let pts = |s: Series| s.0.into_iter().map(|(s, l)| (s as f64, l)).collect();
    Ok((pts(train), pts(val)))
}

fn truncate(s: &str) -> String {
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s.to_string()
    }
}

/// `1.5M`, `300k`, `42`: tick labels for token counts.
fn human(v: f64) -> String {
    let a = v.abs();
    let (d, suffix) = if a >= 1e12 {
        (1e12, "T")
    } else if a >= 1e9 {
        (1e9, "G")
    } else if a >= 1e6 {
        (1e6, "M")
    } else if a >= 1e3 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    let s = format!("{:.2}", v / d);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}{suffix}")
}

fn register_font() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(Error::Internal("the bundled font (assets/fonts/DejaVuSans.ttf) did not load".into()))
    }
}

/// Draw the runs into a PNG (the file's bytes).
pub fn render(runs: &[Run], x: XAxis, title: &str, width: u32, height: u32) -> Result<Vec<u8>> {
    check_size(width, height)?;
    register_font()?;
    let mut rgb = vec![255u8; width as usize * height as usize * 3];
    draw(&mut rgb, runs, x, title, width, height).map_err(|e| Error::Internal(format!("plot: {e}")))?;
    let mut png_bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png_bytes, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(|e| Error::Internal(format!("png: {e}")))?;
        w.write_image_data(&rgb).map_err(|e| Error::Internal(format!("png: {e}")))?;
        w.finish().map_err(|e| Error::Internal(format!("png: {e}")))?;
    }
    Ok(png_bytes)
}

fn draw(rgb: &mut [u8], runs: &[Run], x: XAxis, title: &str, width: u32, height: u32) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let all = || runs.iter().flat_map(|r| r.train.iter().chain(&r.val));
    let (mut x0, mut x1) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if !(x0.is_finite() && x1.is_finite()) {
        (x0, x1) = (0.0, 1.0);
    }
    if !(y0.is_finite() && y1.is_finite()) {
        (y0, y1) = (0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = if y1 > y0 { (y1 - y0) * 0.05 } else { 0.5 };
    (y0, y1) = (y0 - pad, y1 + pad);

    let root = BitMapBackend::with_buffer(rgb, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let big = (height / 32).clamp(12, 40);
    let small = (height / 45).clamp(10, 28);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", big))
        .margin(small)
        .x_label_area_size(small * 3)
        .y_label_area_size(small * 4)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    let x_desc = match x {
        XAxis::Step => "step",
        XAxis::Tokens => "tokens",
    };
    chart
        .configure_mesh()
        .x_desc(format!("{x_desc}   (lines: train loss, dots: val loss)"))
        .y_desc("loss")
        .label_style(("sans-serif", small))
        .axis_desc_style(("sans-serif", small))
        .x_label_formatter(&|v| match x {
            XAxis::Step => format!("{v:.0}"),
            XAxis::Tokens => human(*v),
        })
        .y_label_formatter(&|v| format!("{v:.2}"))
        .draw()?;
    let lw = (height / 400).max(1);
    for (i, r) in runs.iter().enumerate() {
        let (cr, cg, cb) = PALETTE[i % PALETTE.len()];
        let c = RGBColor(cr, cg, cb);
        let legend = move |(lx, ly): (i32, i32)| {
            EmptyElement::at((lx, ly)) + PathElement::new(vec![(0, 0), (20, 0)], c.stroke_width(lw + 1)) + Circle::new((10, 0), 3, c.filled())
        };
        let mut labelled = false;
        if !r.train.is_empty() {
            chart.draw_series(LineSeries::new(r.train.iter().copied(), c.stroke_width(lw)))?.label(r.label.as_str()).legend(legend);
            labelled = true;
        }
        if !r.val.is_empty() {
            let line = chart.draw_series(LineSeries::new(r.val.iter().copied(), c.stroke_width(lw + 1)))?;
            if !labelled {
                line.label(r.label.as_str()).legend(legend);
            }
            chart.draw_series(r.val.iter().map(|&p| Circle::new(p, lw + 3, c.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", small))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.5))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_token_counts() {
        assert_eq!(human(0.0), "0");
        assert_eq!(human(1024.0), "1.02k");
        assert_eq!(human(1_500_000.0), "1.5M");
        assert_eq!(human(2e9), "2G");
    }

    #[test]
    fn a_resumed_run_replaces_repeated_steps() {
        let text = "s:0 tel:10.0\ns:1 trl:9.0 lr:0.1 norm:1\ns:2 trl:8.0\ns:3 trl:7.5\ns:2 trl:8.1\ns:3 trl:7.4\ns:4 trl:7.0\n";
        let (train, val) = parse_main_log(Path::new("main.log"), text, XAxis::Step).unwrap();
        assert_eq!(train, vec![(1.0, 9.0), (2.0, 8.1), (3.0, 7.4), (4.0, 7.0)]);
        assert_eq!(val, vec![(0.0, 10.0)]);
    }

    #[test]
    fn json_tokens_place_val_points() {
        let text =
            "{\"step\":0,\"val_loss\":11.0}\n{\"step\":1,\"train_loss\":10.0,\"tokens\":256}\n{\"step\":2,\"train_loss\":null,\"tokens\":512}\n\
{\"step\":2,\"val_loss\":9.0}\n{\"step\":2,\"eval_accuracy\":0.3}\n";
        let (train, val) = parse_json_log(Path::new("a.jsonl"), text, XAxis::Tokens).unwrap();
        assert_eq!(train, vec![(256.0, 10.0)]);
        assert_eq!(val, vec![(0.0, 11.0), (512.0, 9.0)]);
    }
}
