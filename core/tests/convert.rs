//! JSON <-> Lua conversion through real hook calls: lossless round trips,
//! lazy bodies, and limits in both directions.

use llmproxy_core::config::ScriptLimits;
use llmproxy_core::{Config, Engine, ErrorKind, HookName};
use serde_json::{json, Value};

fn engine(hook: HookName, source: &str) -> Engine {
    Engine::new(Config::single_hook(hook, "test", source, ScriptLimits::default())).expect("compiles")
}

/// Run a `usage` script (its result is free-form JSON) with `input`.
fn usage(source: &str, input: Value) -> Result<Value, (ErrorKind, String)> {
    engine(HookName::Usage, source)
        .run_json(HookName::Usage, &input)
        .map_err(|e| (e.kind, e.message))
}

#[test]
fn values_round_trip_unchanged() {
    // Each value goes in as `usage.v` and comes back as the script's `v`.
    let values = [
        json!([]),
        json!({}),
        json!(null),
        json!([null, 1, "x"]),
        json!({"a": {"b": [[], {}, [[]]]}}),
        json!(0),
        json!(-17),
        json!(9007199254740992i64),
        json!(-9007199254740992i64),
        json!(1.5),
        json!(1e-7),
        json!(123456.789),
        json!("plain"),
        json!("ünïcödé 你好 🎉"),
        json!("quote \" backslash \\ newline \n tab \t nul \u{0}"),
        json!(true),
        json!({"nested": {"deep": {"deeper": {"deepest": [1, 2, 3]}}}}),
    ];
    for v in values {
        let got = usage("return {v = usage.v}", json!({"usage": {"v": v.clone()}}));
        assert_eq!(got, Ok(json!({ "v": v })), "value {v}");
    }
}

#[test]
fn json_helper_round_trips_and_marks_arrays() {
    let cases: &[(&str, Value)] = &[
        ("return {s = json.encode(json.decode('[]'))}", json!({"s": "[]"})),
        ("return {s = json.encode(json.decode('{}'))}", json!({"s": "{}"})),
        ("return {s = json.encode({})}", json!({"s": "{}"})),
        ("return {s = json.encode(json.array())}", json!({"s": "[]"})),
        ("return {s = json.encode(json.empty_array)}", json!({"s": "[]"})),
        ("return {s = json.encode({1, 2, 3})}", json!({"s": "[1,2,3]"})),
        (
            "return {s = json.encode({a = json.null})}",
            json!({"s": "{\"a\":null}"}),
        ),
        (
            "local t = json.decode('[1]'); table.remove(t); return {s = json.encode(t)}",
            json!({"s": "[]"}),
        ),
        (
            "return {s = json.encode({[1] = 'a', [3] = 'c'})}",
            json!({"s": "{\"1\":\"a\",\"3\":\"c\"}"}),
        ),
        ("return {n = json.decode('{\"x\": 2.5}').x * 2}", json!({"n": 5})),
        ("return {ok = json.decode('null') == json.null}", json!({"ok": true})),
        (
            "local t = string_utils.split('a,b,,c', ','); return {n = #t, s = json.encode(t)}",
            json!({"n": 4, "s": "[\"a\",\"b\",\"\",\"c\"]"}),
        ),
        ("return {s = string_utils.trim('  x y \\n')}", json!({"s": "x y"})),
        (
            "return {a = string_utils.starts_with('gpt-4o', 'gpt-'), b = string_utils.ends_with('gpt-4o', '4')}",
            json!({"a": true, "b": false}),
        ),
        (
            "return {m = hash.md5('abc'), s = hash.sha256('')}",
            json!({"m": "900150983cd24fb0d6963f7d28e17f72", "s": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}),
        ),
        (
            "return {t = time.format(0), p = time.parse('2026-12-31T23:59:59Z')}",
            json!({"t": "1970-01-01T00:00:00Z", "p": 1798761599}),
        ),
        (
            "return {t = time.format(86400 * 3, '%Y-%m-%d %a'), p = time.parse('2024-01-16 08:00', '%Y-%m-%d %H:%M')}",
            json!({"t": "1970-01-04 Sun", "p": 1705392000}),
        ),
        (
            "local v, err = time.parse('nope'); return {v = v, err = err ~= nil}",
            json!({"err": true}),
        ),
        (
            "return {ok = type(time.now()) == 'number' and time.now() > 1.7e9}",
            json!({"ok": true}),
        ),
    ];
    for (src, want) in cases {
        assert_eq!(usage(src, json!({})), Ok(want.clone()), "{src}");
    }
}

#[test]
fn lazy_body_round_trips_untouched_fields_byte_for_byte() {
    let body = json!({"model": "gpt-4", "n": 1.0, "big": 12345678901234567890u64, "tools": [], "meta": {}, "x": null});
    let rt = engine(HookName::RequestTransform, "return {body = request.body}");
    let got = rt
        .run_json(
            HookName::RequestTransform,
            &json!({"request": {"id": "r", "body": body.clone()}}),
        )
        .unwrap();
    // Not read by the script: the original JSON (1.0 stays 1.0, u64 stays exact).
    assert_eq!(
        serde_json::to_string(&got["body"]).unwrap(),
        serde_json::to_string(&body).unwrap()
    );

    // Read and modified in place: changes show, the rest is untouched.
    let rt = engine(
        HookName::RequestTransform,
        "request.body.meta.k = 'v'; return {body = request.body}",
    );
    let got = rt
        .run_json(
            HookName::RequestTransform,
            &json!({"request": {"id": "r", "body": body.clone()}}),
        )
        .unwrap();
    assert_eq!(got["body"]["meta"], json!({"k": "v"}));
    assert_eq!(got["body"]["big"], body["big"]);

    // A new key or a deletion turns the lazy table into a plain one.
    let rt = engine(
        HookName::RequestTransform,
        "request.body.model = nil; request.body.extra = 1; return {body = request.body}",
    );
    let got = rt
        .run_json(
            HookName::RequestTransform,
            &json!({"request": {"id": "r", "body": body.clone()}}),
        )
        .unwrap();
    assert_eq!(got["body"].get("model"), None);
    assert_eq!(got["body"]["extra"], json!(1));
    assert_eq!(got["body"]["tools"], json!([]));

    // pairs/next see every field.
    let u = usage(
        "local n = 0 for _ in pairs(request.body) do n = n + 1 end return {n = n, first = next(request.body) ~= nil}",
        json!({"request": {"id": "r", "body": body}}),
    );
    assert_eq!(u, Ok(json!({"n": 6, "first": true})));
}

/// `request` is a lazy view (fields convert on first read); every way a
/// script can look at it gives what a plain table would.
#[test]
fn the_lazy_request_table_behaves_as_a_plain_table() {
    let request = json!({"request": {
        "id": "r", "body": {"model": "m"}, "headers": {"X-A": "1"},
        "user_id": "u", "api_key": "k", "tier": 2
    }});
    let cases = [
        (
            "json.encode sees every field",
            "return json.decode(json.encode(request))",
            json!({"api_key": "k", "body": {"model": "m"}, "headers": {"X-A": "1"}, "id": "r", "tier": 2, "user_id": "u"}),
        ),
        (
            "pairs sees every field once",
            "local n = 0 for _ in pairs(request) do n = n + 1 end return {n = n}",
            json!({"n": 6}),
        ),
        (
            "a field read, then removed, stays removed",
            "local _ = request.user_id request.user_id = nil return {u = request.user_id or 'gone'}",
            json!({"u": "gone"}),
        ),
        (
            "a field never read, removed, stays removed",
            "request.body = nil return {b = request.body or 'gone', id = request.id}",
            json!({"b": "gone", "id": "r"}),
        ),
        (
            "a field replaced after a read",
            "local _ = request.id request.id = 'x' return {id = request.id}",
            json!({"id": "x"}),
        ),
        (
            "a field is the same value on every read",
            "return {same = request.body == request.body and request.headers == request.headers}",
            json!({"same": true}),
        ),
        (
            "absent fields are nil",
            "return {p = request.path == nil, b = request.backend_url == nil}",
            json!({"p": true, "b": true}),
        ),
        (
            "no metatable shows, rawget sees the field",
            "return {mt = getmetatable(request) == nil, id = rawget(request, 'id')}",
            json!({"mt": true, "id": "r"}),
        ),
        (
            "a script's own metatable works",
            "setmetatable(request, {__index = function() return 1 end}) return {x = request.nope, id = request.id}",
            json!({"x": 1, "id": "r"}),
        ),
        (
            "lazy and plain encodings are the same text",
            "local lazy = json.encode(request) for _ in pairs(request) do end return {same = lazy == json.encode(request)}",
            json!({"same": true}),
        ),
        (
            "the returned request is encoded whole",
            "return request",
            json!({"api_key": "k", "body": {"model": "m"}, "headers": {"X-A": "1"}, "id": "r", "tier": 2, "user_id": "u"}),
        ),
    ];
    for (what, src, want) in cases {
        assert_eq!(usage(src, request.clone()), Ok(want), "{what}: {src}");
    }
}

/// A host's object globals (`run_json`, `run_parts`: the C ABI and the
/// Lua module) are lazy tables over their JSON: one a script never reads
/// costs nothing, and at any depth a lazy table and the plain table it
/// turns into encode to the same text (keys sorted, whatever the host's
/// order).
#[test]
fn object_globals_are_lazy_and_encode_as_plain_tables() {
    let usage_global = json!({"z": 1, "nested": {"y": [{"b": 2, "a": 1}], "x": true}, "a": "s"});
    let cases = [
        (
            "the top level",
            "local lazy = json.encode(usage) for _ in pairs(usage) do end \
             return {same = lazy == json.encode(usage), text = lazy}",
        ),
        (
            "a nested object, read through the lazy table",
            "local lazy = json.encode(usage.nested) for _ in pairs(usage.nested) do end \
             return {same = lazy == json.encode(usage.nested), text = lazy}",
        ),
    ];
    let sorted = [
        r#"{"a":"s","nested":{"x":true,"y":[{"a":1,"b":2}]},"z":1}"#,
        r#"{"x":true,"y":[{"a":1,"b":2}]}"#,
    ];
    for ((what, src), text) in cases.into_iter().zip(sorted) {
        let input = json!({"request": {"id": "r", "body": {}}, "usage": usage_global.clone()});
        let got = engine(HookName::Usage, src).run_json(HookName::Usage, &input);
        assert_eq!(
            got.map_err(|e| e.message),
            Ok(json!({"same": true, "text": text})),
            "{what}"
        );
    }
}

/// `backends` is lazy too: encoded before and after it turns into a plain
/// table, it gives the same text, and every backend is there.
#[test]
fn the_lazy_backends_table_encodes_as_a_plain_table() {
    let src = "local lazy = json.encode(backends) \
               local n = 0 for _ in pairs(backends) do n = n + 1 end \
               if lazy == json.encode(backends) and n == 2 and backends.b.weight == 2 then return 'a' end \
               return 'b'";
    let input = json!({
        "request": {"id": "r", "body": {}},
        "backends": {
            "a": {"url": "http://a", "latency_ms": 1.5, "active_connections": 3},
            "b": {"url": "http://b", "weight": 2, "healthy": false}
        }
    });
    let got = engine(HookName::Routing, src).run_json(HookName::Routing, &input);
    assert_eq!(got.map_err(|e| e.message), Ok(json!("a")));
}

#[test]
fn body_raw_is_parsed_in_rust() {
    let got = usage(
        "return {m = request.body.model, n = #request.body.messages}",
        json!({"request": {"id": "r", "body_raw": "{\"model\":\"gpt-4\",\"messages\":[{},{}]}"}}),
    );
    assert_eq!(got, Ok(json!({"m": "gpt-4", "n": 2})));
}

#[test]
fn outputs_that_are_not_json_are_bad_output() {
    let cases = [
        ("return {x = 0/0}", "cannot be represented in JSON"),
        ("return {x = 1/0}", "cannot be represented in JSON"),
        ("return {x = '\\255\\254'}", "not valid UTF-8"),
        ("return {x = print}", "a function cannot be converted"),
        ("local t = {} t.self = t return t", "nesting is deeper than"),
        ("return {[true] = 1}", "a table key of type boolean"),
        // Bare values are encoded inside the call too.
        ("return print", "a function cannot be converted"),
        ("return '\\255'", "not valid UTF-8"),
        ("return 0/0", "cannot be represented in JSON"),
    ];
    for (src, msg) in cases {
        let err = usage(src, json!({})).expect_err(src);
        assert_eq!(err.0, ErrorKind::BadOutput, "{src}: {err:?}");
        assert!(err.1.contains(msg), "{src}: {}", err.1);
    }
}

#[test]
fn deep_and_large_inputs_are_errors_not_crashes() {
    let deep = "[".repeat(100_000) + &"]".repeat(100_000);
    let err = usage("return {n = #json.decode(usage.s)}", json!({"usage": {"s": deep}})).expect_err("deep");
    assert_eq!(err.0, ErrorKind::ScriptError);
    assert!(err.1.contains("json.decode"), "{}", err.1);

    let mut v = json!(1);
    for _ in 0..200 {
        v = json!([v]);
    }
    let e = engine(HookName::Usage, "return nil")
        .run_json(HookName::Usage, &json!({"usage": v}))
        .expect_err("deep input");
    assert_eq!(e.kind, ErrorKind::BadInput);

    let raw = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    let e = engine(HookName::Usage, "return nil")
        .run_json(HookName::Usage, &json!({"request": {"id": "r", "body_raw": raw}}))
        .expect_err("deep body_raw");
    assert_eq!(e.kind, ErrorKind::BadInput);

    let err = usage("local t = {} for i = 1, 64 do t = {t} end return {t = t}", json!({})).expect_err("deep output");
    assert_eq!(err.0, ErrorKind::BadOutput);
}

/// Script results are encoded on the Lua stack, except when a table has a
/// metatable of its own, which sends the whole value through the general
/// encoder. Both must give the same JSON and the same errors: each value
/// is returned bare and inside a table with an empty metatable.
/// Values every encoder of a script's result is checked on.
const RESULT_VALUES: [&str; 20] = [
    "{}",
    "{1, 2, 3}",
    "{[1] = 'a', [3] = 'c'}",
    "{[1.5] = 'x', [-0.0] = 'z', [2^53] = 'big', [-7] = 'neg'}",
    "{a = {b = {c = {1, json.null, {}}}}, z = json.empty_array}",
    "json.decode('[[], {}, [[]], {\"k\": [1, 2.5, -3e300]}]')",
    "{n = 0/0}",
    "{n = 1/0}",
    "{s = '\\255\\254'}",
    "{[true] = 1}",
    "{f = print}",
    "{x = 2^63, y = -2^63, w = 1e300, v = -0.0, u = 0.1}",
    "setmetatable({1, 2}, getmetatable(json.decode('[]')))",
    "{s = string.rep('x', 5000)}",
    "{deep = json.decode(string.rep('[', 30) .. string.rep(']', 30))}",
    "{['ünï'] = 'ok', [''] = 'empty'}",
    // More pairs than the stack walk keeps on the stack, nested in a small
    // object, and a number key next to the same key as a string.
    "(function() local t = {} for i = 1, 70 do t['k' .. (i * 7919 % 97)] = {i = i} end return {big = t} end)()",
    "{[1] = 'number', ['1'] = 'string', [2] = 'two'}",
    "{[string.char(200)] = 1}",
    // Strings the text encoder copies whole next to ones it escapes.
    "{e = 'q\"b\\\\s\\n\\t\\1\\31/\\127é', ['k\"\\n'] = 'plain', p = 'http://x/y'}",
];

#[test]
fn stack_encoder_and_general_encoder_agree() {
    for v in RESULT_VALUES {
        let plain = usage(&format!("return {{v = {v}}}"), json!({}));
        let general = usage(&format!("return setmetatable({{v = {v}}}, {{}})"), json!({}));
        assert_eq!(plain, general, "{v}");
    }
}

/// The objects inside a body (nested, or items of an array) are lazy views
/// too: a script sees plain tables, what it did not touch is encoded byte
/// for byte as the client sent it (key order and number texts included),
/// and a table it changed or made is encoded as a plain table (keys
/// sorted).
#[test]
fn objects_inside_a_body_are_lazy_views_that_behave_as_plain_tables() {
    let client = r#"{"model":"m","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo","n":1.50},5,[{"x":1}]],"meta":{"b":1,"a":{"z":1,"y":[{"q":true}]}}}"#;
    let copy = "local t = {} for k, v in pairs(request.body) do t[k] = v end";
    let cases = [
        (
            "a copy keeps what it did not touch (the copy's own keys sorted)",
            format!("{copy} return {{body = t}}"),
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo","n":1.50},5,[{"x":1}]],"meta":{"b":1,"a":{"z":1,"y":[{"q":true}]}},"model":"m"}"#.to_owned(),
        ),
        (
            "a changed item is a plain table, the rest untouched",
            "request.body.messages[1].content = 'changed' return {body = request.body}".to_owned(),
            client.replace(r#"{"role":"user","content":"hi"}"#, r#"{"content":"changed","role":"user"}"#),
        ),
        (
            "an item read, not changed, keeps its text",
            "local _ = #request.body.messages[2].role + #request.body.messages[1].content return {body = request.body}"
                .to_owned(),
            client.to_owned(),
        ),
    ];
    for (what, script, want) in cases {
        let e = engine(HookName::RequestTransform, &script);
        let input = json!({"request": {"id": "r", "body_raw": client}});
        let got = typed_transform_body(&e, &input).expect(what);
        assert_eq!(String::from_utf8_lossy(&got), want, "{what}");
    }
    let reads = [
        ("length and items", "local m = request.body.messages return {v = {#m, type(m[1]), m[3], m[4][1].x}}", json!([4, "table", 5, 1])),
        ("same view on every read", "local m = request.body.messages return {v = m[1] == m[1] and request.body.meta.a == request.body.meta.a}", json!(true)),
        ("pairs over an item", "local ks = {} for k in pairs(request.body.messages[2]) do ks[#ks + 1] = k end table.sort(ks) return {v = ks}", json!(["content", "n", "role"])),
        ("ipairs over the array", "local n = 0 for _, m in ipairs(request.body.messages) do n = n + 1 end return {v = n}", json!(4)),
        ("rawget and next", "local a = request.body.meta.a return {v = {rawget(a, 'z'), next(request.body.messages[1]) ~= nil}}", json!([1, true])),
        ("deep reads", "return {v = request.body.meta.a.y[1].q}", json!(true)),
        ("json.encode of an item", "return {v = json.decode(json.encode(request.body.messages[2]))}", json!({"content": "yo", "n": 1.5, "role": "assistant"})),
        ("a new field on an item", "local m = request.body.messages[1] m.name = 'x' return {v = m}", json!({"content": "hi", "name": "x", "role": "user"})),
    ];
    let input = json!({"request": {"id": "r", "body": serde_json::from_str::<Value>(client).expect("json")}});
    for (what, script, want) in reads {
        assert_eq!(usage(script, input.clone()).map(|v| v["v"].clone()), Ok(want), "{what}");
    }
}

/// A lazy view in a script's result (a field of the input the script
/// returned whole, read from or not) is written by the stack encoder as
/// the general encoder writes it: the source's order, the source's JSON
/// for fields no script read, and the same errors past the depth limit.
#[test]
fn lazy_views_encode_alike_on_both_encoders() {
    let deep = (0..62).fold(json!(1), |v, _| json!([v]));
    let input = json!({"request": {"id": "r", "body": {
        "model": "m", "z": 1, "a": [1, {"b": 2}], "meta": {"k": "v", "n": {"x": [true, null]}}, "deep": deep,
    }}});
    let cases = [
        "request.body.meta",
        "{request.body.meta, request.body.meta.n}",
        "(function() local m = request.body.meta local _ = m.n.x return m end)()",
        "(function() local m = request.body.meta local _ = m.k return {m, m.n} end)()",
        "request.body",
        "{w = {request.body}}",
        "{w = {x = {request.body}}}",
    ];
    for v in cases {
        let plain = usage(&format!("return {{v = {v}}}"), input.clone());
        let general = usage(&format!("return setmetatable({{v = {v}}}, {{}})"), input.clone());
        assert_eq!(plain, general, "{v}");
    }
}

/// A transform's body is encoded straight to JSON text (no
/// `serde_json::Value` in between): it must be the text the JSON entry
/// point's value encodes as, byte for byte, and fail the same way. Each
/// value goes as the body, bare and in a table with a metatable (the
/// general encoder), and the client's body comes back through a copy, as
/// the seed transform makes it (numbers a double cannot hold included).
#[test]
fn a_body_encoded_as_text_is_the_text_of_the_json_result() {
    let client = r#"{"model":"gpt-4","big":123456789012345678901234567890,"f":0.1000000000000000055511151231257827,"messages":[{"role":"user","content":"hi \"there\"\n"}],"meta":{"a":[],"b":{}},"stream":false}"#;
    let copy = "(function() local t = {} for k, v in pairs(request.body) do t[k] = v end return t end)()";
    let lazy = "request.body";
    let cases = RESULT_VALUES
        .iter()
        .flat_map(|v| [v.to_string(), format!("setmetatable({{v = {v}}}, {{}})")])
        .chain([copy.to_owned(), lazy.to_owned(), "{v = request.body.meta}".to_owned()]);
    for body in cases {
        let e = engine(
            HookName::RequestTransform,
            &format!("return {{body = {body}, headers = {{['X-A'] = 'b'}}}}"),
        );
        let input = json!({"request": {"id": "r", "body_raw": client}});
        let as_json = e
            .run_json(HookName::RequestTransform, &input)
            .map(|v| serde_json::to_vec(&v["body"]).expect("text"))
            .map_err(|e| (e.kind, e.message));
        let typed = typed_transform_body(&e, &input).map_err(|e| (e.kind, e.message));
        match (&as_json, &typed) {
            (Ok(a), Ok(b)) => assert_eq!(String::from_utf8_lossy(a), String::from_utf8_lossy(b), "{body}"),
            (Err(a), Err(b)) => assert_eq!(a.0, b.0, "{body}: {a:?} / {b:?}"),
            _ => panic!("{body}: the JSON entry point gave {as_json:?}, the typed one {typed:?}"),
        }
    }
}

/// The body text `request_transform` gives through the typed entry point
/// for the JSON input `input` (empty when it gives none), to compare with
/// `run_json`'s.
fn typed_transform_body(e: &Engine, input: &Value) -> Result<Vec<u8>, llmproxy_core::HookError> {
    let info = llmproxy_core::hooks::RequestInfo::from_json(
        &input["request"],
        llmproxy_core::convert::Limits {
            max_depth: 100,
            max_bytes: usize::MAX,
        },
    )
    .expect("request");
    e.transform_request(&llmproxy_core::hooks::RequestTransformInput { request: &info })
        .map(|rw| rw.and_then(|rw| rw.body).map(|b| b.text).unwrap_or_default())
}

/// The rest of a result whose body went apart as text is read as it would
/// be with the body: the same verdict from the typed and the JSON entry
/// points (an array item beside the body is an ignored field, a table
/// marked as an array with a body is refused).
#[test]
fn a_result_without_its_body_is_judged_as_the_whole_result() {
    let results = [
        "{body = {a = 1}, 'x'}",
        "setmetatable({body = {a = 1}}, getmetatable(json.decode('[]')))",
        "setmetatable({body = {a = 1}, headers = {['X-A'] = 'b'}}, {})",
        "{body = {a = 1}, headers = 3}",
        "{body = json.null}",
    ];
    for result in results {
        let e = engine(HookName::RequestTransform, &format!("return {result}"));
        let input = json!({"request": {"id": "r", "body": {"model": "m"}}});
        let as_json = e
            .run_json(HookName::RequestTransform, &input)
            .map(|v| v["body"].to_string())
            .map_err(|e| e.kind);
        let typed = typed_transform_body(&e, &input)
            .map(|text| String::from_utf8_lossy(&text).into_owned())
            .map_err(|e| e.kind);
        assert_eq!(as_json, typed, "{result}");
    }
}

/// Numbers at the edges of what a double holds, and duplicate keys: what the
/// upstream gets is what the client sent unless a script changed it.
#[test]
fn numbers_a_double_cannot_hold_keep_their_text() {
    let body = r#"{"model":"m","big":123456789012345678901234567890,"seed":9223372036854775807,"neg":-9007199254740993,"z":-0,"f":0.1000000000000000055511151231257827,"one":1.0,"n":3}"#;
    let input = format!(r#"{{"request":{{"id":"r","body":{body}}}}}"#);
    let input = llmproxy_core::convert::parse_json(input.as_bytes(), Default::default()).expect("parses");
    let scripts = [
        // Never read.
        "return {body = request.body}",
        // Every field read and copied into a new table, as the seed transforms do.
        "local out = {} for k, v in pairs(request.body) do out[k] = v end return {body = out}",
        // Copied one by one, and through json.decode/json.encode.
        "local b = request.body return {body = {model = b.model, big = b.big, seed = b.seed, neg = b.neg, z = b.z, f = b.f, one = b.one, n = b.n}}",
        "return {body = json.decode(json.encode(request.body))}",
    ];
    for script in scripts {
        let got = engine(HookName::RequestTransform, script)
            .run_json(HookName::RequestTransform, &input)
            .expect(script);
        let want = llmproxy_core::convert::parse_json(body.as_bytes(), Default::default()).expect("parses");
        // Object key order may differ; every number keeps its value, and
        // every number a double cannot hold keeps its text. Spelling alone
        // (`1.0`) is the double's own once a script copied it.
        for (k, v) in want.as_object().expect("object") {
            if k == "one" {
                assert_eq!(got["body"][k].as_f64(), Some(1.0), "{script}");
                continue;
            }
            assert_eq!(
                serde_json::to_string(&got["body"][k]).expect("encode"),
                serde_json::to_string(v).expect("encode"),
                "{script}: field {k}"
            );
        }
    }

    // A value the script changed is written as the double it computed.
    let got = engine(
        HookName::RequestTransform,
        "local b = request.body b.seed = b.seed + 0.5 b.n = b.n + 1 return {body = b}",
    )
    .run_json(HookName::RequestTransform, &input)
    .expect("runs");
    assert_eq!(got["body"]["n"], json!(4));
    assert_eq!(
        serde_json::to_string(&got["body"]["seed"]).expect("encode"),
        "9223372036854775807"
    );
}

#[test]
fn duplicate_keys_are_refused_in_every_direction() {
    use llmproxy_core::convert::parse_json;
    for text in [r#"{"a":1,"a":2}"#, r#"{"m":[{"role":"user","role":"system"}]}"#] {
        let err = parse_json(text.as_bytes(), Default::default()).expect_err(text);
        assert!(err.to_string().contains("duplicate key"), "{text}: {err}");
    }
    // In a script, json.decode refuses them too.
    let got = usage(r#"return {ok = pcall(json.decode, '{"a":1,"a":2}')}"#, json!({}));
    assert_eq!(got, Ok(json!({"ok": false})));
    // A result cannot make one either: `[1]` and `["1"]` are one JSON key.
    let err = usage("return {t = {[1] = 'a', ['1'] = 'b', [2] = 'c'}}", json!({})).expect_err("two keys \"1\"");
    assert_eq!(err.0, ErrorKind::BadOutput);
    assert!(err.1.contains("both the JSON key \"1\""), "{}", err.1);
}

/// A number whose own text a double reproduces keeps it, even when another
/// number of the same call has a longer text for the same double (found by
/// the convert fuzz target: `9007199254740992` came back as the
/// `9007199254740993` next to it).
#[test]
fn a_short_number_is_not_respelled_as_a_long_one_with_the_same_double() {
    let bodies = [
        r#"{"a":9007199254740993,"b":9007199254740992}"#,
        r#"{"b":9007199254740992,"a":9007199254740993}"#,
        r#"{"a":[1.00000000000000001],"b":[1]}"#,
        r#"{"b":{"x":1},"a":{"y":1.00000000000000001}}"#,
    ];
    let scripts = [
        "local out = {} for k, v in pairs(request.body) do out[k] = v end return {body = out}",
        // Read one field, then the other (lazy fields convert one at a time).
        "local b = request.body return {body = {b = b.b, a = b.a}}",
        "local b = request.body return {body = {a = b.a, b = b.b}}",
        "return {body = json.decode(json.encode(request.body))}",
    ];
    for body in bodies {
        let input = format!(r#"{{"request":{{"id":"r","body":{body}}}}}"#);
        let input = llmproxy_core::convert::parse_json(input.as_bytes(), Default::default()).expect("parses");
        let want = llmproxy_core::convert::parse_json(body.as_bytes(), Default::default()).expect("parses");
        for script in scripts {
            let got = engine(HookName::RequestTransform, script)
                .run_json(HookName::RequestTransform, &input)
                .expect(script);
            assert_eq!(
                serde_json::to_string(&got["body"]["b"]).expect("encode"),
                serde_json::to_string(&want["b"]).expect("encode"),
                "{body} / {script}"
            );
        }
    }
}

/// A transform's new body is read from the spans the encoder noted
/// (`model`, `stream`, `stream_options`) instead of scanning its text: the
/// verdict (stream, include_usage, or the refusal) is the one a full read
/// of the same text gives, for every way a script builds the body: the
/// request's view handed back, a copy of it (a plain table holding views),
/// a table decoded by the script, and one with more keys than the encoder
/// keeps on the Lua stack.
#[test]
fn a_new_body_reads_the_same_from_its_spans_as_from_its_text() {
    use llmproxy_core::http::fields::TextBody;
    let many: serde_json::Map<String, Value> = (0..70).map(|i| (format!("k{i:02}"), json!(i))).collect();
    let bodies = [
        json!({}),
        json!({"model": "gpt-4", "stream": true}),
        json!({"stream": false, "stream_options": {"include_usage": true}}),
        json!({"stream": true, "stream_options": {"include_usage": true}, "z": 1}),
        json!({"stream": null, "stream_options": null}),
        json!({"stream_options": {"include_usage": null, "other": 1}}),
        json!({"messages": [{"stream": true, "stream_options": {"include_usage": true}}], "model": "m"}),
        json!({"metadata": {"stream": "true"}, "stream": true}),
        json!({"a": [[{"stream": 1}]], "stream": true, "stream_options": {"include_usage": false}}),
        json!({"stream": "true"}),
        json!({"stream": 1}),
        json!({"stream": [true]}),
        json!({"model": 4, "stream": true}),
        json!({"model": null}),
        json!({"stream_options": []}),
        json!({"stream": true, "stream_options": {"include_usage": "yes"}}),
        Value::Object({
            let mut m = many.clone();
            m.insert("stream".into(), json!(true));
            m.insert("stream_options".into(), json!({"include_usage": true}));
            m
        }),
        Value::Object({
            let mut m = many;
            m.insert("model".into(), json!(7));
            m
        }),
    ];
    let scripts = [
        "return {body = request.body}",
        "local b = {} for k, v in pairs(request.body) do b[k] = v end return {body = b}",
        "return {body = json.decode(json.encode(request.body))}",
    ];
    for script in scripts {
        let e = engine(HookName::RequestTransform, script);
        for body in &bodies {
            let info = llmproxy_core::hooks::RequestInfo {
                id: "r".into(),
                body: std::sync::Arc::new(body.clone()),
                ..Default::default()
            };
            let got = e
                .transform_request(&llmproxy_core::hooks::RequestTransformInput { request: &info })
                .map(|r| r.and_then(|r| r.body).expect("a new body"));
            // The full read, on the text the call wrote.
            let text = match &got {
                Ok(b) => b.text.clone(),
                Err(_) => serde_json::to_vec(body).expect("text"),
            };
            let whole = TextBody::new(text);
            match (&got, &whole) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{script} / {body}"),
                (Err(a), Err(b)) => {
                    assert_eq!(a.kind, ErrorKind::BadOutput, "{script} / {body}");
                    assert!(a.message.ends_with(&b.to_string()), "{script} / {body}: {a:?} / {b}");
                }
                _ => panic!("{script} / {body}: from the spans {got:?}, from the text {whole:?}"),
            }
        }
    }
}

/// A transform's headers are read off the Lua stack when they are a table
/// of strings, booleans and `json.null`, and encoded as a value otherwise:
/// both give the same changes and the same refusals. The same results
/// wrapped in a metatable of their own always take the general path after
/// the call, so each case is compared with itself encoded that way.
#[test]
fn headers_read_off_the_stack_match_the_general_path() {
    let many: String = (0..70).map(|i| format!("['X-H{i:02}'] = 'v', ")).collect();
    let cases = [
        "{['X-A'] = 'b'}".to_owned(),
        "{['x-b'] = 'b', ['X-A'] = false, ['X-C'] = json.null, ['X-D'] = true}".to_owned(),
        "{}".to_owned(),
        "json.empty_array".to_owned(),
        "request.headers".to_owned(),
        "{Connection = 'close', ['Keep-Alive'] = 'x', ['X-A'] = '1'}".to_owned(),
        "{['Bad Name'] = 'x', ['X-A'] = 'y'}".to_owned(),
        "{['X-A'] = 'a\\r\\nb'}".to_owned(),
        "{['X-A'] = 'a\\0b'}".to_owned(),
        "{[''] = 'x'}".to_owned(),
        "{['X-N'] = 3, ['X-F'] = 0.5}".to_owned(),
        "{['X-T'] = {}}".to_owned(),
        "{['X-T'] = {1, 2}}".to_owned(),
        "{'x'}".to_owned(),
        "{[1] = 'x', ['X-A'] = 'y'}".to_owned(),
        "{['X-A'] = '\\255'}".to_owned(),
        "{['\\255'] = 'x'}".to_owned(),
        "{['X-A'] = print}".to_owned(),
        "request.body".to_owned(),
        format!("{{{many}}}"),
        "{['X-A'] = string.rep('v', 4000)}".to_owned(),
        "{['X-A'] = string.rep('v', 4070)}".to_owned(),
    ];
    let limits = ScriptLimits {
        max_output_bytes: 4096,
        ..ScriptLimits::default()
    };
    let info = llmproxy_core::hooks::RequestInfo {
        id: "r".into(),
        body: std::sync::Arc::new(json!({"model": "m", "a": 1})),
        headers: vec![("X-Seen".into(), "yes".into()), ("Content-Type".into(), "a/b".into())],
        ..Default::default()
    };
    let run = |source: &str| {
        let e = Engine::new(Config::single_hook(HookName::RequestTransform, "t", source, limits)).expect("compiles");
        e.transform_request(&llmproxy_core::hooks::RequestTransformInput { request: &info })
            .map_err(|e| (e.kind, e.message))
    };
    for headers in &cases {
        let read = run(&format!("return {{headers = {headers}, body = {{model = 'x'}}}}"));
        let general = run(&format!(
            "return setmetatable({{headers = {headers}, body = {{model = 'x'}}}}, {{}})"
        ));
        assert_eq!(read, general, "{headers}");
    }
}
