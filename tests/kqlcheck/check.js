#!/usr/bin/env node
// Checks KQL queries and control commands with Microsoft's own parser and
// semantic binder: Kusto.Language (the library behind Azure Data Explorer's
// editors), compiled to JavaScript and published on npm as
// @kusto/language-service-next (pinned in package.json).
//
// Input (JSON on stdin):
//   {
//     "database": "db",                                  // optional, default "db"
//     "tables": {"T": [["col", "string"], ...], ...},
//     "materialized_views": {                            // optional
//       "V": {"query": "T | summarize arg_max(x, *) by k",
//             "columns": [["col", "type"], ...]}         // optional: derived from query
//     },
//     "functions": [                                     // optional: stored functions, as
//       {"name": "F", "parameters": "x:string",          // `.create function F(x:string)
//        "body": "T | where c == x"}, ...             //  { T | where c == x }` defines them
//     ],
//     "analyzers": false,                                // optional: also run the editor's
//                                                        // analyzers (style hints, severity
//                                                        // usually Warning/Suggestion)
//     "literals": false,                                 // optional: also return the
//                                                        // decoded value of every string
//                                                        // literal ("literals": [...])
//     "items": [{"name": "...", "text": "<query or .command>"}, ...]
//   }
//
// Output (JSON on stdout), one entry per item, in order:
//   [{"name": "...", "kind": "Query" | "Command" | ...,
//     "diagnostics": [{"severity": "Error" | "Warning" | "Suggestion" | "Information",
//                      "is_error": true | false,
//                      "code": "KS142", "message": "...",
//                      "start": 20, "length": 4,      // offsets into the item's text
//                      "source": "binder" | "analyzer"}]}]
//
// Exit status: 0 when the check ran (whatever it found), 2 on bad input.
//
// JS API used (Bridge.NET spelling of the C# API):
//   Kusto.Language.Symbols.ScalarTypes.GetSymbol(typeName)
//   new Kusto.Language.Symbols.ColumnSymbol(name, type, description, originalColumns, source, examples)
//   new Kusto.Language.Symbols.TableSymbol.$ctor4(name, columns[])
//   new Kusto.Language.Symbols.MaterializedViewSymbol.$ctor2(name, columns, query, description)
//   new Kusto.Language.Symbols.FunctionSymbol.$ctor16(name, "(params)", "{ body }", description)
//   new Kusto.Language.Symbols.DatabaseSymbol.ctor(name, members[])
//   Kusto.Language.GlobalState.Default.WithDatabase(database)
//   Kusto.Language.KustoCode.ParseAndAnalyze(text, globals) -> code
//   code.GetDiagnostics() -> IReadOnlyList<Diagnostic> (.Count, .getItem(i))
//   code.ResultType (a TableSymbol for tabular queries; .Columns)
//   new Kusto.Language.Editor.KustoCodeService.ctor(code).GetAnalyzerDiagnostics(true)

"use strict";

const fs = require("fs");
const path = require("path");

function loadKustoLanguage() {
  // The package is two classic scripts: the Bridge.NET runtime, then the
  // compiled Kusto.Language assembly. Both attach to the global object
  // (Bridge, System, Kusto); the minified builds load about 3x faster.
  const pkgDir = path.dirname(
    require.resolve("@kusto/language-service-next/package.json", { paths: [__dirname] })
  );
  require(path.join(pkgDir, "bridge.min.js"));
  require(path.join(pkgDir, "Kusto.Language.Bridge.min.js"));
  return globalThis.Kusto.Language;
}

function fail(message) {
  process.stderr.write(`kqlcheck: ${message}\n`);
  process.exit(2);
}

function listToArray(list) {
  const out = [];
  if (!list) return out;
  for (let i = 0; i < list.Count; i++) out.push(list.getItem(i));
  return out;
}

// The values of the string literals in a parsed text, in order, as the parser decodes
// them (SyntaxNode.LiteralValue of each StringLiteralExpression; adjacent literals that
// KQL joins are one expression): how a test reads back what a literal means to Kusto.
function stringLiterals(L, root) {
  const kind = L.Syntax.SyntaxKind.StringLiteralExpression;
  const values = [];
  (function walk(node) {
    if (!node) return;
    if (node.Kind === kind && typeof node.LiteralValue === "string") {
      values.push(node.LiteralValue);
      return;
    }
    for (let i = 0; i < node.ChildCount; i++) walk(node.GetChild(i));
  })(root);
  return values;
}

function main() {
  let input;
  try {
    input = JSON.parse(fs.readFileSync(0, "utf8"));
  } catch (e) {
    fail(`stdin is not valid JSON: ${e.message}`);
  }
  if (input === null || typeof input !== "object") fail("input must be a JSON object");
  const items = input.items;
  if (!Array.isArray(items)) fail('input needs "items": [{"name": ..., "text": ...}]');

  const L = loadKustoLanguage();
  const S = L.Symbols;

  function scalarType(typeName, where) {
    const t = typeof typeName === "string" ? S.ScalarTypes.GetSymbol(typeName) : null;
    if (!t) fail(`unknown Kusto scalar type ${JSON.stringify(typeName)} (${where})`);
    return t;
  }

  function columnSymbols(columns, where) {
    if (!Array.isArray(columns)) fail(`columns of ${where} must be a list of [name, type]`);
    return columns.map((c) => {
      if (!Array.isArray(c) || c.length !== 2 || typeof c[0] !== "string") {
        fail(`bad column ${JSON.stringify(c)} in ${where}: expected [name, type]`);
      }
      return new S.ColumnSymbol(c[0], scalarType(c[1], `${where}.${c[0]}`), null, null, null, null);
    });
  }

  const dbName = typeof input.database === "string" ? input.database : "db";
  const members = [];
  for (const [name, columns] of Object.entries(input.tables || {})) {
    members.push(new S.TableSymbol.$ctor4(name, columnSymbols(columns, `table ${name}`)));
  }

  // Materialized views: their schema is the result schema of their query,
  // bound against the tables, unless given explicitly.
  const views = input.materialized_views || {};
  if (Object.keys(views).length > 0) {
    const tablesOnly = L.GlobalState.Default.WithDatabase(new S.DatabaseSymbol.ctor(dbName, members.slice()));
    for (const [name, spec] of Object.entries(views)) {
      if (!spec || typeof spec.query !== "string") fail(`materialized view ${name} needs "query"`);
      let cols;
      if (spec.columns) {
        cols = columnSymbols(spec.columns, `materialized view ${name}`);
      } else {
        const code = L.KustoCode.ParseAndAnalyze(spec.query, tablesOnly);
        const errors = listToArray(code.GetDiagnostics()).filter((d) => d.Severity === "Error");
        if (errors.length > 0) {
          fail(`query of materialized view ${name} does not bind: ${errors.map((d) => d.Message).join("; ")}`);
        }
        const rt = code.ResultType;
        if (!rt || !rt.Columns) fail(`query of materialized view ${name} is not tabular`);
        cols = listToArray(rt.Columns);
      }
      members.push(new S.MaterializedViewSymbol.$ctor2(name, cols, spec.query, null));
    }
  }

  // Stored functions: Kusto.Language binds a call by binding the function's body (as
  // the database's own functions are bound in the editors); a function's result
  // schema is the result of its body. FunctionSymbol(name, "(params)", "{ body }").
  const functions = input.functions || [];
  if (!Array.isArray(functions)) fail('"functions" must be a list of {name, parameters, body}');
  for (const f of functions) {
    if (!f || typeof f.name !== "string" || typeof f.body !== "string") {
      fail(`bad function ${JSON.stringify(f)}: expected {name, parameters, body}`);
    }
    const params = typeof f.parameters === "string" ? f.parameters : "";
    members.push(new S.FunctionSymbol.$ctor16(f.name, `(${params})`, `{\n${f.body}\n}`, null));
  }

  const globals = L.GlobalState.Default.WithDatabase(new S.DatabaseSymbol.ctor(dbName, members));

  function convert(d, source) {
    return {
      severity: d.Severity,
      is_error: d.Severity === "Error",
      code: d.Code,
      message: d.Message,
      start: d.HasLocation ? d.Start : null,
      length: d.HasLocation ? d.Length : null,
      source,
    };
  }

  const results = items.map((item, i) => {
    if (!item || typeof item.text !== "string") fail(`item ${i} needs a string "text"`);
    const name = item.name === undefined ? String(i) : item.name;
    const code = L.KustoCode.ParseAndAnalyze(item.text, globals);
    const diagnostics = listToArray(code.GetDiagnostics()).map((d) => convert(d, "binder"));
    if (input.analyzers) {
      const service = new L.Editor.KustoCodeService.ctor(code);
      for (const d of listToArray(service.GetAnalyzerDiagnostics(true))) {
        diagnostics.push(convert(d, "analyzer"));
      }
    }
    const out = { name, kind: code.Kind, diagnostics };
    if (input.literals) out.literals = stringLiterals(L, code.Syntax);
    return out;
  });

  process.stdout.write(JSON.stringify(results) + "\n");
}

main();
