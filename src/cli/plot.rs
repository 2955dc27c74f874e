//! The report plot: test accuracy against executed FLOP fraction, with batch-1 latency on a
//! second axis (SVG, plotters).

use std::path::Path;

use plotters::prelude::*;

use super::eval::EvalRow;

pub fn accuracy_vs_flops(path: &Path, model: &str, rows: &[EvalRow]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut points: Vec<&EvalRow> = rows.iter().collect();
    points.sort_by(|a, b| a.flop_fraction.total_cmp(&b.flop_fraction));
    let acc_min = points.iter().map(|r| r.accuracy * 100.0).fold(f64::INFINITY, f64::min).floor() - 1.0;
    let acc_max = points.iter().map(|r| r.accuracy * 100.0).fold(f64::NEG_INFINITY, f64::max).ceil() + 0.5;
    let timed: Vec<(f64, f64)> =
        points.iter().filter_map(|r| r.latency_ms.map(|ms| (r.flop_fraction, ms))).collect();
    let lat_max = timed.iter().map(|&(_, ms)| ms).fold(0.0, f64::max) * 1.15 + 1e-3;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{model}: accuracy and latency vs executed FLOPs"), ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(60)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0.0..1.05, acc_min..acc_max)?
        .set_secondary_coord(0.0..1.05, 0.0..lat_max);
    chart.configure_mesh().x_desc("executed FLOPs / dense FLOPs").y_desc("test accuracy (%)").draw()?;
    chart.configure_secondary_axes().y_desc("batch-1 latency (ms)").draw()?;
    let blue = RGBColor(31, 119, 180);
    let orange = RGBColor(255, 127, 14);
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|r| (r.flop_fraction, r.accuracy * 100.0)),
            blue.stroke_width(2),
        ))?
        .label("accuracy")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue));
    chart.draw_series(
        points.iter().map(|r| Circle::new((r.flop_fraction, r.accuracy * 100.0), 4, blue.filled())),
    )?;
    chart
        .draw_secondary_series(LineSeries::new(timed.iter().copied(), orange.stroke_width(2)))?
        .label("batch-1 latency")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], orange));
    chart.draw_secondary_series(timed.iter().map(|&p| Circle::new(p, 4, orange.filled())))?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}
