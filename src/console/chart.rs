//! Samples drawn as SVG (no script, no library): a polyline per series in a fixed view box,
//! styled by the console's stylesheet (`.line.s0`…, legend keys `.k0`…), rendered by the
//! partial `templates/console/chart.html`. The x axis is the hour up to the chart's end; the
//! y axis runs from 0 at the bottom to the largest value of any series (at least 1) at the top.

/// The view box's width and height: the SVG scales to its box, the numbers stay these.
pub const VIEW_WIDTH: f64 = 600.0;
pub const VIEW_HEIGHT: f64 = 120.0;

/// The time a chart spans, ending at [`Chart::end_ms`].
pub const WINDOW_MS: i64 = 3_600_000;

/// Colours the stylesheet has for series (`.s0`–`.s3`); more series reuse them in turn.
const COLOURS: usize = 4;

/// One line: values over time, `(unix ms, value)`, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub values: Vec<(i64, f64)>,
}

/// A chart of some series.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// Unique in the page: names the `<title>` the SVG is labelled by.
    pub id: String,
    pub title: String,
    /// The right edge of the x axis, unix ms (now).
    pub end_ms: i64,
    pub series: Vec<Series>,
}

/// A series as the template draws it.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// The polyline's colour class (`s0`…).
    pub class: String,
    /// The legend key's colour class (`k0`…).
    pub key: String,
    pub label: String,
    /// The polyline's `points` attribute, in the view box.
    pub points: String,
}

impl Chart {
    pub fn view_box(&self) -> String {
        format!("0 0 {VIEW_WIDTH} {VIEW_HEIGHT}")
    }

    /// The top of the y axis: the largest value shown, at least 1 (so an idle chart is a
    /// flat line at the bottom, not a division by zero).
    pub fn max(&self) -> f64 {
        self.shown()
            .flat_map(|values| values.iter().map(|(_, v)| *v))
            .fold(1.0, f64::max)
    }

    /// [`Chart::max`] as the legend reads it: `12`, `2.5`.
    pub fn max_label(&self) -> String {
        let max = self.max();
        if max.fract() == 0.0 {
            format!("{max:.0}")
        } else {
            format!("{max:.1}")
        }
    }

    /// Each series as a polyline in the view box, coloured in turn.
    pub fn lines(&self) -> Vec<Line> {
        let max = self.max();
        let start = self.end_ms - WINDOW_MS;
        self.series
            .iter()
            .zip(self.shown())
            .enumerate()
            .map(|(i, (series, values))| Line {
                class: format!("s{}", i % COLOURS),
                key: format!("k{}", i % COLOURS),
                label: series.label.clone(),
                points: values
                    .iter()
                    .map(|&(at, v)| {
                        let x = (at - start) as f64 / WINDOW_MS as f64 * VIEW_WIDTH;
                        let y = VIEW_HEIGHT - v.max(0.0) / max * VIEW_HEIGHT;
                        format!("{x:.1},{y:.1}")
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
            })
            .collect()
    }

    /// The values of each series that fall in the chart's hour.
    fn shown(&self) -> impl Iterator<Item = &[(i64, f64)]> {
        let start = self.end_ms - WINDOW_MS;
        self.series.iter().map(move |series| {
            let values = series.values.as_slice();
            let from = values.partition_point(|(at, _)| *at < start);
            let to = values.partition_point(|(at, _)| *at <= self.end_ms);
            &values[from..to.max(from)]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const END: i64 = 10 * WINDOW_MS;

    fn chart(series: &[&[(i64, f64)]]) -> Chart {
        Chart {
            id: "c".into(),
            title: "Chart".into(),
            end_ms: END,
            series: series
                .iter()
                .enumerate()
                .map(|(i, values)| Series {
                    label: format!("series {i}"),
                    values: values.to_vec(),
                })
                .collect(),
        }
    }

    fn points(chart: &Chart) -> Vec<String> {
        chart.lines().into_iter().map(|l| l.points).collect()
    }

    #[test]
    fn an_empty_chart_has_a_top_of_one_and_no_points() {
        let empty = chart(&[]);
        assert_eq!(empty.max(), 1.0);
        assert_eq!(empty.max_label(), "1");
        assert!(empty.lines().is_empty());
        assert_eq!(points(&chart(&[&[]])), [""]);
        assert_eq!(empty.view_box(), "0 0 600 120");
    }

    #[test]
    fn one_point_sits_at_its_time_and_value() {
        // Half an hour before the end, value 4 of a top of 4: the middle, at the top.
        let c = chart(&[&[(END - WINDOW_MS / 2, 4.0)]]);
        assert_eq!(c.max(), 4.0);
        assert_eq!(points(&c), ["300.0,0.0"]);
    }

    #[test]
    fn a_flat_idle_series_lies_on_the_bottom() {
        let c = chart(&[&[(END - WINDOW_MS, 0.0), (END, 0.0)]]);
        assert_eq!(c.max(), 1.0);
        assert_eq!(points(&c), ["0.0,120.0 600.0,120.0"]);
        let busy = chart(&[&[(END - WINDOW_MS, 3.0), (END, 3.0)]]);
        assert_eq!(points(&busy), ["0.0,0.0 600.0,0.0"]);
    }

    #[test]
    fn every_series_is_scaled_to_the_largest_value_of_all() {
        let c = chart(&[&[(END, 2.5)], &[(END, 10.0)]]);
        assert_eq!(c.max(), 10.0);
        assert_eq!(c.max_label(), "10");
        assert_eq!(points(&c), ["600.0,90.0", "600.0,0.0"]);
        let lines = c.lines();
        assert_eq!(
            (lines[0].class.as_str(), lines[0].key.as_str()),
            ("s0", "k0")
        );
        assert_eq!(
            (lines[1].class.as_str(), lines[1].key.as_str()),
            ("s1", "k1")
        );
        assert_eq!(chart(&[&[(END, 2.5)]]).max_label(), "2.5");
    }

    #[test]
    fn values_outside_the_hour_are_not_drawn_nor_scaled_to() {
        let c = chart(&[&[
            (END - WINDOW_MS - 1, 100.0),
            (END - WINDOW_MS / 4, 2.0),
            (END + 1, 100.0),
        ]]);
        assert_eq!(c.max(), 2.0);
        assert_eq!(points(&c), ["450.0,0.0"]);
    }
}
