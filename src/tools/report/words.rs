//! The league table's words in Chinese (the default, as officers read it) and English: one
//! table per language, so a phrase missing in one is a build error, not a blank. `{}` marks
//! where [`fill`] puts a value, in order. Not here: the CSV and JSON field names, which stay
//! English (they are read by programs).

use crate::console::i18n::Lang;

pub struct Words {
    pub html_lang: &'static str,
    pub title: &'static str,
    /// The "how to read this page" box (HTML), with the three score weights.
    pub how: &'static str,
    pub no_records: &'static str,
    /// Period {id} ({calls}).
    pub period: &'static str,
    pub h_calls: &'static str,
    pub h_refused: &'static str,
    pub h_avail: &'static str,
    /// Unattributed: {records}, {reasons}.
    pub unattributed_html: &'static str,
    pub th: [&'static str; 14],
    pub chart_calls: &'static str,
    pub legend_provided: &'static str,
    pub legend_consumed: &'static str,
    /// {dept}: {n} calls provided.
    pub bar_provided: &'static str,
    pub bar_consumed: &'static str,
    pub no_calls: &'static str,
    pub no_refused: &'static str,
    pub chart_refused: &'static str,
    pub all_its_calls: &'static str,
    /// {dept}: {n} of {calls} refused with {reason} ({pct}).
    pub bar_refused: &'static str,
    /// {pct} ({n} of {calls}).
    pub refused_value: &'static str,
    pub no_served: &'static str,
    pub chart_avail: &'static str,
    pub avail_legend: [&'static str; 3],
    /// {dept}: {ok} of {allowed} served without a provider error.
    pub bar_avail: &'static str,
    /// {pct} ({n} provider errors).
    pub avail_value: &'static str,
    // The terminal table.
    pub table_title: &'static str,
    /// == {period} ({records}) ==
    pub period_line: &'static str,
    pub cols: [&'static str; 15],
    pub denials_by_reason: &'static str,
    pub its_calls: &'static str,
    pub calls_to_it: &'static str,
    /// {records}: {reasons}.
    pub unattributed_text: &'static str,
    // The range line.
    /// {records}, {period}.
    pub range_records: &'static str,
    /// {from} to {to}.
    pub range_from_to: &'static str,
    pub range_start: &'static str,
    pub range_end: &'static str,
    /// {offset}, {policy version}.
    pub range_zone_policy: &'static str,
    /// {n} unreadable.
    pub range_unreadable: &'static str,
    pub range_none: &'static str,
    pub periods: [(&'static str, &'static str); 4],
}

pub fn words(lang: Lang) -> &'static Words {
    match lang {
        Lang::Zh => &ZH,
        Lang::En => &EN,
    }
}

/// `template` with each `{}` replaced by the next of `args`.
pub fn fill(template: &str, args: &[&dyn std::fmt::Display]) -> String {
    let mut out = String::with_capacity(template.len() + 16 * args.len());
    let mut rest = template;
    let mut args = args.iter();
    while let Some(i) = rest.find("{}") {
        out.push_str(&rest[..i]);
        if let Some(a) = args.next() {
            use std::fmt::Write;
            let _ = write!(out, "{a}");
        }
        rest = &rest[i + 2..];
    }
    out.push_str(rest);
    out
}

/// How many terminal columns `s` takes (CJK and full-width characters take two).
pub fn width(s: &str) -> usize {
    s.chars()
        .map(|c| match c as u32 {
            0x1100..=0x115F
            | 0x2E80..=0x303E
            | 0x3041..=0x33FF
            | 0x3400..=0x4DBF
            | 0x4E00..=0x9FFF
            | 0xA000..=0xA4CF
            | 0xAC00..=0xD7A3
            | 0xF900..=0xFAFF
            | 0xFE30..=0xFE4F
            | 0xFF00..=0xFF60
            | 0xFFE0..=0xFFE6 => 2,
            _ => 1,
        })
        .sum()
}

/// `s` padded to `w` terminal columns, on the right (`left`) or the left.
pub fn pad(s: &str, w: usize, left: bool) -> String {
    let fill = " ".repeat(w.saturating_sub(width(s)));
    if left {
        format!("{s}{fill}")
    } else {
        format!("{fill}{s}")
    }
}

static ZH: Words = Words {
    html_lang: "zh-CN",
    title: "数据共享排行榜",
    how: "<div class=\"box\"><p><b>如何阅读本页。</b>部门之间的每一次调用都经过交换网关，并在其审计日志中留下一条记录；本页统计的就是这些记录。\
所请求的数据属于某部门的数据集时，该部门<b>提供</b>了这次调用；发起调用的部门<b>使用</b>了这次调用。\
网关未放行的调用为<b>被拒绝</b>（无共享协议、字段或用途未经约定、超出限流等）。\
<b>可用率</b>是放行到某部门数据集的调用中，其系统未出错而应答的比例。响应时间为放行调用的中位数（p50）和最慢的 1%（p99）。</p>\
<p><b>得分</b>（0 至 100）= {} × 提供的调用数 ÷ 本周期内提供最多的部门的调用数 + {} × 提供的数据集数 ÷ 最多的部门的数据集数 + {} × 可用率\
（未提供任何调用的部门为 0）。得分相同的部门名次相同。<b>使用方得分</b>（不计入排名）是某部门发起的调用中被放行的比例：只使用、不提供数据的部门以此衡量。</p></div>\n",
    no_records: "所选时间范围内没有记录。",
    period: "周期 {} <span class=\"note\">（{} 次调用）</span>",
    h_calls: "提供与使用的调用",
    h_refused: "被拒绝的调用，按原因（占各部门发起调用的比例）",
    h_avail: "各部门数据集的可用率",
    unattributed_html: "未归属任何部门（不参与排名）：{} 条记录，例如未持有效证书而被拒绝的连接：{}。",
    th: [
        "名次",
        "部门",
        "得分",
        "使用方得分",
        "提供的调用",
        "提供的数据集",
        "可用率",
        "被拒绝（对其）",
        "p50 / p99 毫秒（提供）",
        "发起的调用",
        "使用的数据集",
        "被拒绝（其发起）",
        "p50 / p99 毫秒（发起）",
        "拒绝原因（其发起）",
    ],
    chart_calls: "各部门提供与使用的调用",
    legend_provided: "提供的调用（访问其数据集）",
    legend_consumed: "使用的调用（由其发起）",
    bar_provided: "{}：提供 {} 次调用",
    bar_consumed: "{}：发起 {} 次调用",
    no_calls: "没有调用。",
    no_refused: "没有被拒绝的调用。",
    chart_refused: "各部门发起的调用中被拒绝的比例，按原因",
    all_its_calls: "其全部调用的 100%",
    bar_refused: "{}：{} 次调用中有 {} 次因 {} 被拒绝（{}）",
    refused_value: "{}（{} / {}）",
    no_served: "本周期内没有部门提供调用。",
    chart_avail: "各部门数据集的可用率",
    avail_legend: ["99% 及以上", "95% 至 99%", "低于 95%"],
    bar_avail: "{}：{} 次中有 {} 次应答无提供方错误",
    avail_value: "{}（{} 次提供方错误）",
    table_title: "数据共享排行榜：{}",
    period_line: "== {}（{} 条记录）==",
    cols: [
        "名次",
        "部门",
        "得分",
        "使用分",
        "提供",
        "数据集",
        "可用率",
        "p50毫秒",
        "p99毫秒",
        "被拒",
        "发起",
        "使用",
        "p50毫秒",
        "p99毫秒",
        "被拒",
    ],
    denials_by_reason: "拒绝原因：",
    its_calls: "其发起",
    calls_to_it: "对其调用",
    unattributed_text: "未归属任何部门（不参与排名）：{} 条记录：{}",
    range_records: "{} 条记录，按{}统计",
    range_from_to: "，自 {} 至 {}",
    range_start: "最早",
    range_end: "最新",
    range_zone_policy: "（UTC{}），数据集归属取自策略 {}",
    range_unreadable: "，跳过 {} 条无法读取的记录",
    range_none: "；范围内没有记录",
    periods: [
        ("day", "日"),
        ("week", "周"),
        ("month", "月"),
        ("all", "全部"),
    ],
};

static EN: Words = Words {
    html_lang: "en",
    title: "Data sharing league table",
    how: "<div class=\"box\"><p><b>How to read this page.</b> Every call between departments passes the \
exchange gateway and leaves one record in its audit trail; this page counts them. A department \
<b>provides</b> a call when the data asked for is one of its datasets, and <b>consumes</b> a call \
when it made it. A call is <b>refused</b> when the gateway did not let it through (no sharing \
agreement, a field or purpose not agreed, a rate limit, ...). <b>Availability</b> is the share of \
let-through calls to a department's datasets that its system answered without failing. Response \
times are the median (p50) and the slowest 1% (p99) of let-through calls.</p>\
<p><b>Score</b> (0 to 100) = {} × calls served ÷ the most served by any department in the \
period + {} × datasets served ÷ the most served by any department + {} × availability \
(0 for a department that served no calls). Departments with equal scores share a rank. \
The <b>consumer score</b> (not part of the ranking) is the share of the calls a department made \
that were let through: what a department that only consumes is measured on.</p></div>\n",
    no_records: "No records in the selected time range.",
    period: "Period {} <span class=\"note\">({} calls)</span>",
    h_calls: "Calls provided and consumed",
    h_refused: "Refused calls, by reason (share of the calls each department made)",
    h_avail: "Availability of each department's datasets",
    unattributed_html: "Not attributed to any department (not ranked): {} record(s), e.g. refused connections without a valid certificate: {}.",
    th: [
        "Rank",
        "Department",
        "Score",
        "Consumer score",
        "Calls provided",
        "Datasets provided",
        "Availability",
        "Refused (to it)",
        "p50 / p99 ms (provided)",
        "Calls made",
        "Datasets used",
        "Refused (its calls)",
        "p50 / p99 ms (made)",
        "Refusal reasons (its calls)",
    ],
    chart_calls: "Calls provided and consumed per department",
    legend_provided: "calls provided (to its datasets)",
    legend_consumed: "calls consumed (made by it)",
    bar_provided: "{}: {} calls provided",
    bar_consumed: "{}: {} calls consumed",
    no_calls: "No calls.",
    no_refused: "No call was refused.",
    chart_refused: "Share of each department's calls that were refused, by reason",
    all_its_calls: "100% of its calls",
    bar_refused: "{}: of {} calls, {} refused with {} ({})",
    refused_value: "{} ({} of {})",
    no_served: "No department served a call in this period.",
    chart_avail: "Availability of each department's datasets",
    avail_legend: ["99% or more", "95% to 99%", "below 95%"],
    bar_avail: "{}: of {} calls, {} served without a provider error",
    avail_value: "{} ({} provider errors)",
    table_title: "Sharing league table: {}",
    period_line: "== {} ({} records) ==",
    cols: [
        "rank",
        "department",
        "score",
        "cons.",
        "provided",
        "ds",
        "avail",
        "p50 ms",
        "p99 ms",
        "denied",
        "consumed",
        "used",
        "p50 ms",
        "p99 ms",
        "denied",
    ],
    denials_by_reason: "denials by reason:",
    its_calls: "its calls",
    calls_to_it: "calls to it",
    unattributed_text: "unattributed (no consumer department, not ranked): {} record(s): {}",
    range_records: "{} record(s), by {}",
    range_from_to: ", from {} to {}",
    range_start: "the start",
    range_end: "the end",
    range_zone_policy: " (UTC{}), owners from policy {}",
    range_unreadable: ", {} unreadable record(s) skipped",
    range_none: "; no records in range",
    periods: [
        ("day", "day"),
        ("week", "week"),
        ("month", "month"),
        ("all", "all"),
    ],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_and_width() {
        assert_eq!(fill("{}: {} of {}", &[&"a", &3, &4.5]), "a: 3 of 4.5");
        assert_eq!(fill("no holes", &[&1]), "no holes");
        assert_eq!(width("名次"), 4);
        assert_eq!(pad("名次", 6, true), "名次  ");
        assert_eq!(pad("ab", 4, false), "  ab");
    }

    #[test]
    fn both_languages_fill_the_same_holes() {
        let holes = |s: &str| s.matches("{}").count();
        for (zh, en) in [
            (ZH.how, EN.how),
            (ZH.period, EN.period),
            (ZH.unattributed_html, EN.unattributed_html),
            (ZH.bar_provided, EN.bar_provided),
            (ZH.bar_refused, EN.bar_refused),
            (ZH.refused_value, EN.refused_value),
            (ZH.bar_avail, EN.bar_avail),
            (ZH.avail_value, EN.avail_value),
            (ZH.table_title, EN.table_title),
            (ZH.period_line, EN.period_line),
            (ZH.unattributed_text, EN.unattributed_text),
            (ZH.range_records, EN.range_records),
            (ZH.range_from_to, EN.range_from_to),
            (ZH.range_zone_policy, EN.range_zone_policy),
            (ZH.range_unreadable, EN.range_unreadable),
        ] {
            assert_eq!(holes(zh), holes(en), "{zh} / {en}");
        }
    }
}
