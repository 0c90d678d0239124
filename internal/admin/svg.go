package admin

import (
	"fmt"
	"html"
	"html/template"
	"math"
	"strings"
)

// series is one line of a chart: a value per minute, NaN where there is
// none (no depth sample that minute).
type series struct {
	Name   string
	Color  string
	Values []float64
}

// chart sizes, in SVG user units.
const (
	chartW, chartH = 720, 200
	padL, padR     = 44, 10
	padT, padB     = 10, 22
)

// lineChart renders series as an inline SVG line chart over the last
// hour, with a y axis from zero to a round maximum and a legend. Only
// numbers and escaped names go into the markup.
func lineChart(id, title string, ss []series) template.HTML {
	top := 0.0
	n := 0
	for _, s := range ss {
		n = max(n, len(s.Values))
		for _, v := range s.Values {
			if !math.IsNaN(v) {
				top = math.Max(top, v)
			}
		}
	}
	top = niceCeil(top)
	plotW, plotH := float64(chartW-padL-padR), float64(chartH-padT-padB)
	x := func(i int) float64 {
		if n <= 1 {
			return padL
		}
		return padL + plotW*float64(i)/float64(n-1)
	}
	y := func(v float64) float64 { return padT + plotH*(1-v/top) }

	var b strings.Builder
	fmt.Fprintf(&b, `<svg id="%s" class="chart" viewBox="0 0 %d %d" role="img" aria-label="%s" data-max="%g" xmlns="http://www.w3.org/2000/svg">`,
		html.EscapeString(id), chartW, chartH, html.EscapeString(title), top)
	for _, f := range []float64{0, 0.5, 1} {
		v := top * f
		fmt.Fprintf(&b, `<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" class="grid"/>`, padL, chartW-padR, y(v), y(v))
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" class="axis" text-anchor="end">%s</text>`, padL-6, y(v)+4, fmtNum(v))
	}
	for i, label := range []string{"-60m", "-45m", "-30m", "-15m", "now"} {
		xi := int(math.Round(float64(n-1) * float64(i) / 4))
		anchor := "middle"
		if i == 4 {
			anchor = "end"
		}
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" class="axis" text-anchor="%s">%s</text>`, x(xi), chartH-6, anchor, label)
	}
	for _, s := range ss {
		var pts []string
		var px, py float64 // the last point
		for i, v := range s.Values {
			if !math.IsNaN(v) {
				px, py = x(i), y(v)
				pts = append(pts, fmt.Sprintf("%.1f,%.1f", px, py))
			}
		}
		if len(pts) == 1 {
			// A single sample: a dot, since a one-point polyline is invisible.
			fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="3" fill="%s" data-series="%s"/>`, px, py, html.EscapeString(s.Color), html.EscapeString(s.Name))
			continue
		}
		fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2" points="%s" data-series="%s"/>`,
			html.EscapeString(s.Color), strings.Join(pts, " "), html.EscapeString(s.Name))
	}
	b.WriteString(`</svg><div class="legend">`)
	for _, s := range ss {
		fmt.Fprintf(&b, `<span><i style="background:%s"></i>%s</span>`, html.EscapeString(s.Color), html.EscapeString(s.Name))
	}
	b.WriteString(`</div>`)
	return template.HTML(b.String())
}

// niceCeil rounds v up to 1, 2 or 5 times a power of ten (at least 1).
func niceCeil(v float64) float64 {
	if v <= 1 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if v <= m*p {
			return m * p
		}
	}
	return 10 * p
}

func fmtNum(v float64) string {
	if v == math.Trunc(v) {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.1f", v)
}
