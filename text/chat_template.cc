// A small Jinja interpreter: a lexer that applies jinja2's whitespace rules, a
// recursive-descent parser into a node tree, and an evaluator over a small Value type.
// Where jinja2 and Python disagree with intuition (str() of values, undefined lookups,
// list indexing, json.dumps spacing) this follows jinja2 and Python, because the
// rendered prompt must be token-for-token what the model was trained on.
#include "text/chat_template.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include "text/utf8.h"

namespace epic::text {
namespace chat_template_internal {
namespace {

using nlohmann::json;

// ---------------------------------------------------------------------------------
// Errors. Every error is "chat template line N: ..."; throwing inside the interpreter
// keeps the recursive code readable, and the public entry points turn it into a Status.

struct TemplateError {
  int line;
  std::string message;
};

[[noreturn]] void Fail(int line, std::string message) { throw TemplateError{line, std::move(message)}; }

// What one render may build, so that a template cannot hang or exhaust memory (found by
// fuzz/chat_template.cc): jinja2's sandbox caps range() at 100000 items; the loop
// iterations of a render and the items of a list are capped the same, strings (the output
// among them) at 16 MiB, far more than any context holds. Chat templates loop over the
// messages and stay far below.
constexpr int64_t kMaxIterations = 100000;
// Expressions and tags nest at most this deep: the parser, the evaluator and the trees'
// destructors recurse over them (Python refuses 200 nested parentheses).
constexpr int kMaxDepth = 128;
constexpr size_t kMaxStringBytes = size_t{1} << 24;

void CheckStringSize(size_t bytes, int line) {
  if (bytes > kMaxStringBytes) Fail(line, "a string of more than " + std::to_string(kMaxStringBytes) + " bytes");
}

Status ToStatus(const TemplateError& e) {
  return InvalidArgumentError("chat template line " + std::to_string(e.line) + ": " + e.message);
}

// ---------------------------------------------------------------------------------
// UTF-8. Python strings index, slice and measure by code point.

std::u32string Decode(std::string_view s) {
  std::u32string out;
  for (size_t i = 0; i < s.size();) {
    auto c = static_cast<unsigned char>(s[i]);
    int n = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    char32_t cp = n == 1 ? c : n == 2 ? c & 0x1F : n == 3 ? c & 0x0F : c & 0x07;
    for (int k = 1; k < n && i + k < s.size(); ++k) cp = (cp << 6) | (s[i + k] & 0x3F);
    out.push_back(cp);
    i += n;
  }
  return out;
}

std::string Encode(std::u32string_view s) {
  std::string out;
  for (char32_t c : s) AppendUtf8(out, c);
  return out;
}

// Python's str.isspace(), which jinja2's \s and str.strip() use.
bool IsSpace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
         c == 0x202F || c == 0x205F || c == 0x3000;
}

std::string StripChars(std::string_view s, const std::u32string* chars, bool left, bool right) {
  std::u32string u = Decode(s);
  auto strip = [&](char32_t c) {
    return chars ? chars->find(c) != std::u32string::npos : IsSpace(c);
  };
  size_t b = 0, e = u.size();
  while (left && b < e && strip(u[b])) ++b;
  while (right && e > b && strip(u[e - 1])) --e;
  return Encode(std::u32string_view(u).substr(b, e - b));
}

// ---------------------------------------------------------------------------------
// Values: Python's None, bool, int, float, str, list, dict, plus jinja2's Undefined and
// namespace. Lists and dicts are shared and never mutated (the sandbox is immutable);
// a namespace is shared and mutable, which is how `set ns.x` escapes a loop.

struct Value;
using List = std::vector<Value>;
using Dict = std::vector<std::pair<std::string, Value>>;  // insertion-ordered, as in Python

struct Value {
  enum class Type { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kNamespace };
  Type type = Type::kUndefined;
  bool b = false;
  bool tuple = false;  // a list that Python would print as a tuple, e.g. from dict.items()
  int64_t i = 0;
  double f = 0;
  std::string s;  // the string, or for an undefined value the name that was looked up
  std::shared_ptr<const List> list;
  std::shared_ptr<Dict> dict;  // dict or namespace attributes
  // Lists and dicts nested in it, itself counted (at most kMaxDepth: printing, comparing
  // and destroying recurse), and whether a namespace is among them (a namespace may hold
  // none, so that none can hold itself).
  int depth = 0;
  bool holds_namespace = false;

  static Value Undefined(std::string name) { Value v; v.s = std::move(name); return v; }
  static Value None() { Value v; v.type = Type::kNone; return v; }
  static Value Bool(bool b) { Value v; v.type = Type::kBool; v.b = b; return v; }
  static Value Int(int64_t i) { Value v; v.type = Type::kInt; v.i = i; return v; }
  static Value Float(double f) { Value v; v.type = Type::kFloat; v.f = f; return v; }
  static Value Str(std::string s) { Value v; v.type = Type::kString; v.s = std::move(s); return v; }
  static Value MakeList(List l, bool tuple = false) {
    Value v; v.type = Type::kList; v.tuple = tuple; v.depth = 1;
    for (const Value& e : l) v.Contain(e);
    v.list = std::make_shared<const List>(std::move(l)); return v;
  }
  static Value MakeDict(Dict d, Type type = Type::kDict) {
    Value v; v.type = type; v.depth = 1;
    for (const auto& [k, e] : d) v.Contain(e);
    v.dict = std::make_shared<Dict>(std::move(d)); return v;
  }
  // Accounts for E inside this container. Line 0: the statement being run names it.
  void Contain(const Value& e) {
    depth = std::max(depth, e.depth + 1);
    if (depth > kMaxDepth) Fail(0, "a value nested more than " + std::to_string(kMaxDepth) + " deep");
    holds_namespace = holds_namespace || e.holds_namespace || e.type == Type::kNamespace;
  }

  bool undefined() const { return type == Type::kUndefined; }
  bool numeric() const { return type == Type::kBool || type == Type::kInt || type == Type::kFloat; }
  double AsDouble() const { return type == Type::kFloat ? f : static_cast<double>(AsInt()); }
  int64_t AsInt() const { return type == Type::kBool ? b : type == Type::kInt ? i : static_cast<int64_t>(f); }

  const Value* Find(std::string_view key) const {
    for (const auto& [k, v] : *dict) if (k == key) return &v;
    return nullptr;
  }
};
using Type = Value::Type;

Value FromJson(const json& j, int depth = 0) {
  if (depth > kMaxDepth) Fail(0, "the context is nested more than " + std::to_string(kMaxDepth) + " deep");
  switch (j.type()) {
    case json::value_t::null: return Value::None();
    case json::value_t::boolean: return Value::Bool(j.get<bool>());
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return Value::Int(j.get<int64_t>());
    case json::value_t::number_float: return Value::Float(j.get<double>());
    case json::value_t::string: return Value::Str(j.get<std::string>());
    case json::value_t::array: {
      List l;
      for (const auto& e : j) l.push_back(FromJson(e, depth + 1));
      return Value::MakeList(std::move(l));
    }
    case json::value_t::object: {
      Dict d;
      for (const auto& [k, v] : j.items()) d.emplace_back(k, FromJson(v, depth + 1));
      return Value::MakeDict(std::move(d));
    }
    default: return Value::None();
  }
}

const char* TypeName(const Value& v) {
  switch (v.type) {
    case Type::kUndefined: return "undefined";
    case Type::kNone: return "NoneType";
    case Type::kBool: return "bool";
    case Type::kInt: return "int";
    case Type::kFloat: return "float";
    case Type::kString: return "str";
    case Type::kList: return "list";
    case Type::kDict: return "dict";
    case Type::kNamespace: return "Namespace";
  }
  return "?";
}

bool Truthy(const Value& v) {
  switch (v.type) {
    case Type::kUndefined: case Type::kNone: return false;
    case Type::kBool: return v.b;
    case Type::kInt: return v.i != 0;
    case Type::kFloat: return v.f != 0;
    case Type::kString: return !v.s.empty();
    case Type::kList: return !v.list->empty();
    case Type::kDict: return !v.dict->empty();
    case Type::kNamespace: return true;
  }
  return false;
}

// Python's repr(float): the shortest round-trip digits, scientific outside [1e-4, 1e16).
std::string FloatRepr(double f) {
  if (std::isnan(f)) return "nan";
  if (std::isinf(f)) return f > 0 ? "inf" : "-inf";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, f, std::chars_format::scientific);
  std::string sci(buf, end);  // "-1.2345e+02"
  size_t e_pos = sci.find('e');
  int exp = std::stoi(sci.substr(e_pos + 1));
  std::string mantissa = sci.substr(0, e_pos);
  bool negative = mantissa[0] == '-';
  if (negative) mantissa.erase(0, 1);
  std::string digits;
  for (char c : mantissa) if (c != '.') digits += c;
  std::string out = negative ? "-" : "";
  if (exp < -4 || exp >= 16) {
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    std::string e = std::to_string(std::abs(exp));
    return out + (exp < 0 ? "e-" : "e+") + (e.size() < 2 ? "0" : "") + e;
  }
  if (exp < 0) return out + "0." + std::string(-exp - 1, '0') + digits;
  if (static_cast<int>(digits.size()) <= exp + 1) return out + digits + std::string(exp + 1 - digits.size(), '0') + ".0";
  return out + digits.substr(0, exp + 1) + "." + digits.substr(exp + 1);
}

std::string StrRepr(std::string_view s) {
  bool has_single = s.find('\'') != std::string_view::npos;
  char quote = has_single && s.find('"') == std::string_view::npos ? '"' : '\'';
  std::string out(1, quote);
  for (char32_t c : Decode(s)) {
    if (c == '\\' || c == static_cast<char32_t>(quote)) { out += '\\'; out += static_cast<char>(c); }
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || (c >= 0x7F && c <= 0xA0) || c == 0xAD) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned>(c));
      out += buf;
    } else {
      AppendUtf8(out, c);
    }
  }
  return out + quote;
}

std::string Str(const Value& v, bool repr = false);

std::string Str(const Value& v, bool repr) {
  switch (v.type) {
    case Type::kUndefined: return "";
    case Type::kNone: return "None";
    case Type::kBool: return v.b ? "True" : "False";
    case Type::kInt: return std::to_string(v.i);
    case Type::kFloat: return FloatRepr(v.f);
    case Type::kString: return repr ? StrRepr(v.s) : v.s;
    case Type::kList: {
      std::string out = v.tuple ? "(" : "[";
      for (size_t k = 0; k < v.list->size(); ++k) out += (k ? ", " : "") + Str((*v.list)[k], true);
      return out + (!v.tuple ? "]" : v.list->size() == 1 ? ",)" : ")");
    }
    case Type::kDict: {
      std::string out = "{";
      bool first = true;
      for (const auto& [k, e] : *v.dict) {
        out += (first ? "" : ", ") + StrRepr(k) + ": " + Str(e, true);
        first = false;
      }
      return out + "}";
    }
    case Type::kNamespace: {
      std::string out = "<Namespace {";
      bool first = true;
      for (const auto& [k, e] : *v.dict) {
        out += (first ? "" : ", ") + StrRepr(k) + ": " + Str(e, true);
        first = false;
      }
      return out + "}>";
    }
  }
  return "";
}

// json.dumps(value, ensure_ascii=False, indent=indent, separators=..., sort_keys=...).
struct JsonStyle {
  int indent = -1;  // None
  std::string item_sep, key_sep;
  bool sort_keys = false;
};

void DumpJson(const Value& v, const JsonStyle& style, int depth, std::string& out, int line) {
  auto newline = [&](int d) {
    if (style.indent >= 0) out += "\n" + std::string(static_cast<size_t>(style.indent) * d, ' ');
  };
  auto dump_string = [&](std::string_view s) {
    out += '"';
    for (unsigned char c : s) {
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        default:
          if (c < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", c);
            out += buf;
          } else {
            out += static_cast<char>(c);
          }
      }
    }
    out += '"';
  };
  switch (v.type) {
    case Type::kNone: out += "null"; return;
    case Type::kBool: out += v.b ? "true" : "false"; return;
    case Type::kInt: out += std::to_string(v.i); return;
    case Type::kFloat:
      out += std::isnan(v.f) ? "NaN" : std::isinf(v.f) ? (v.f > 0 ? "Infinity" : "-Infinity") : FloatRepr(v.f);
      return;
    case Type::kString: dump_string(v.s); return;
    case Type::kList: {
      if (v.list->empty()) { out += "[]"; return; }
      out += '[';
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += style.item_sep;
        newline(depth + 1);
        DumpJson((*v.list)[k], style, depth + 1, out, line);
      }
      newline(depth);
      out += ']';
      return;
    }
    case Type::kDict: {
      if (v.dict->empty()) { out += "{}"; return; }
      std::vector<const std::pair<std::string, Value>*> items;
      for (const auto& kv : *v.dict) items.push_back(&kv);
      if (style.sort_keys) {
        std::stable_sort(items.begin(), items.end(), [](auto* a, auto* b) { return a->first < b->first; });
      }
      out += '{';
      for (size_t k = 0; k < items.size(); ++k) {
        if (k) out += style.item_sep;
        newline(depth + 1);
        dump_string(items[k]->first);
        out += style.key_sep;
        DumpJson(items[k]->second, style, depth + 1, out, line);
      }
      newline(depth);
      out += '}';
      return;
    }
    default: Fail(line, std::string("Object of type ") + TypeName(v) + " is not JSON serializable");
  }
}

bool Equal(const Value& a, const Value& b) {
  if (a.numeric() && b.numeric()) {
    if (a.type == Type::kFloat || b.type == Type::kFloat) return a.AsDouble() == b.AsDouble();
    return a.AsInt() == b.AsInt();
  }
  if (a.type != b.type) return false;
  switch (a.type) {
    case Type::kUndefined: case Type::kNone: return true;
    case Type::kString: return a.s == b.s;
    case Type::kList:
      return a.tuple == b.tuple && a.list->size() == b.list->size() &&
             std::equal(a.list->begin(), a.list->end(), b.list->begin(), Equal);
    case Type::kDict:
      if (a.dict->size() != b.dict->size()) return false;
      for (const auto& [k, v] : *a.dict) {
        const Value* other = b.Find(k);
        if (!other || !Equal(v, *other)) return false;
      }
      return true;
    default: return a.dict == b.dict;
  }
}

// <0, 0, >0 like Python's ordering, or an error for unorderable types.
int Compare(const Value& a, const Value& b, int line) {
  if (a.numeric() && b.numeric()) {
    double x = a.AsDouble(), y = b.AsDouble();
    if (a.type != Type::kFloat && b.type != Type::kFloat) return a.AsInt() < b.AsInt() ? -1 : a.AsInt() > b.AsInt();
    return x < y ? -1 : x > y;
  }
  if (a.type == Type::kString && b.type == Type::kString) return a.s.compare(b.s);  // UTF-8 byte order is code point order
  if (a.type == Type::kList && b.type == Type::kList) {
    for (size_t k = 0; k < a.list->size() && k < b.list->size(); ++k) {
      if (!Equal((*a.list)[k], (*b.list)[k])) return Compare((*a.list)[k], (*b.list)[k], line);
    }
    return a.list->size() < b.list->size() ? -1 : a.list->size() > b.list->size();
  }
  Fail(line, std::string("'<' not supported between instances of '") + TypeName(a) + "' and '" + TypeName(b) + "'");
}

// The items a `for` loop or a filter sees: list elements, dict keys, string characters.
List Iterate(const Value& v, int line) {
  switch (v.type) {
    case Type::kUndefined: return {};
    case Type::kList: return *v.list;
    case Type::kDict: {
      List keys;
      for (const auto& kv : *v.dict) keys.push_back(Value::Str(kv.first));
      return keys;
    }
    case Type::kString: {
      List chars;
      for (char32_t c : Decode(v.s)) chars.push_back(Value::Str(Encode(std::u32string(1, c))));
      return chars;
    }
    default: Fail(line, std::string("'") + TypeName(v) + "' object is not iterable");
  }
}

[[noreturn]] void FailUndefined(const Value& v, int line) { Fail(line, "'" + v.s + "' is undefined"); }

// ---------------------------------------------------------------------------------
// Lexer. jinja2's whitespace rules, in the order its lexer applies them:
//  - one trailing newline of the source is dropped (keep_trailing_newline=False);
//  - `{%-`/`{{-`/`{#-` strip all whitespace before the tag;
//  - otherwise lstrip_blocks strips spaces and tabs between a line start and `{%`/`{#`;
//  - `-%}`/`-}}`/`-#}` strip all whitespace after; trim_blocks drops one newline after
//    `%}`/`#}` unless written `+%}`.

struct Token {
  enum class Kind { kData, kBlockBegin, kBlockEnd, kVarBegin, kVarEnd, kName, kString, kInt, kFloat, kOp, kEnd };
  Kind kind;
  std::string text;
  int line;
};
using TK = Token::Kind;

int CountNewlines(std::string_view s) { return static_cast<int>(std::count(s.begin(), s.end(), '\n')); }

std::string RStripSpace(std::string_view s) { return StripChars(s, nullptr, false, true); }

// Length of the whitespace prefix of S, in bytes.
size_t SpacePrefix(std::string_view s) {
  size_t n = 0;
  while (n < s.size()) {
    auto c = static_cast<unsigned char>(s[n]);
    size_t len = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    std::u32string cp = Decode(s.substr(n, len));
    if (cp.empty() || !IsSpace(cp[0])) break;
    n += len;
  }
  return n;
}

std::string DecodeStringLiteral(std::string_view body, int line) {
  std::string out;
  for (size_t k = 0; k < body.size(); ++k) {
    char c = body[k];
    if (c != '\\' || k + 1 == body.size()) { out += c; continue; }
    char e = body[++k];
    auto hex = [&](int digits) {
      if (k + digits >= body.size()) Fail(line, "truncated escape in string literal");
      char32_t cp = 0;
      for (int d = 0; d < digits; ++d) {
        char h = body[k + 1 + d];
        if (!std::isxdigit(static_cast<unsigned char>(h))) Fail(line, "invalid escape in string literal");
        cp = cp * 16 + (std::isdigit(static_cast<unsigned char>(h)) ? h - '0' : (std::tolower(h) - 'a' + 10));
      }
      k += digits;
      AppendUtf8(out, cp);
    };
    switch (e) {
      case 'n': out += '\n'; break;
      case 't': out += '\t'; break;
      case 'r': out += '\r'; break;
      case 'a': out += '\a'; break;
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'v': out += '\v'; break;
      case '\\': out += '\\'; break;
      case '\'': out += '\''; break;
      case '"': out += '"'; break;
      case '\n': break;
      case 'x': hex(2); break;
      case 'u': hex(4); break;
      case 'U': hex(8); break;
      default:
        if (e >= '0' && e <= '7') {
          char32_t cp = e - '0';
          for (int d = 0; d < 2 && k + 1 < body.size() && body[k + 1] >= '0' && body[k + 1] <= '7'; ++d) cp = cp * 8 + (body[++k] - '0');
          AppendUtf8(out, cp);
        } else {
          out += '\\';
          out += e;
        }
    }
  }
  return out;
}

std::vector<Token> Lex(std::string_view raw) {
  // Newlines are normalized to \n everywhere, strings included, as jinja2 does.
  std::string src;
  for (size_t k = 0; k < raw.size(); ++k) {
    if (raw[k] == '\r') { src += '\n'; if (k + 1 < raw.size() && raw[k + 1] == '\n') ++k; }
    else src += raw[k];
  }
  if (!src.empty() && src.back() == '\n') src.pop_back();

  std::vector<Token> tokens;
  size_t pos = 0;
  int line = 1;
  bool line_starting = true;
  // After a tag: `-` strips all following whitespace, trim_blocks one newline.
  auto after_tag_end = [&](size_t end, char sign, bool trim) {
    size_t p = end;
    if (sign == '-') p += SpacePrefix(std::string_view(src).substr(p));
    else if (sign != '+' && trim && p < src.size() && src[p] == '\n') ++p;
    line_starting = src[p - 1] == '\n';
    line += CountNewlines(std::string_view(src).substr(end, p - end));
    pos = p;
  };
  while (pos < src.size()) {
    size_t start = src.find('{', pos);
    while (start != std::string::npos && start + 1 < src.size() && src[start + 1] != '{' &&
           src[start + 1] != '%' && src[start + 1] != '#') {
      start = src.find('{', start + 1);
    }
    if (start == std::string::npos || start + 1 >= src.size()) {
      tokens.push_back({TK::kData, src.substr(pos), line});
      break;
    }
    char kind = src[start + 1];
    char sign = start + 2 < src.size() && (src[start + 2] == '-' || src[start + 2] == '+') ? src[start + 2] : 0;
    std::string text = src.substr(pos, start - pos);
    int text_line = line;
    line += CountNewlines(text);
    if (sign == '-') {
      text = RStripSpace(text);
    } else if (sign != '+' && kind != '{') {
      size_t l_pos = text.rfind('\n');
      l_pos = l_pos == std::string::npos ? 0 : l_pos + 1;
      if ((l_pos > 0 || line_starting) && l_pos < text.size() &&
          SpacePrefix(std::string_view(text).substr(l_pos)) == text.size() - l_pos) {
        text.resize(l_pos);
      }
    }
    if (!text.empty()) tokens.push_back({TK::kData, text, text_line});
    size_t p = start + 2 + (sign ? 1 : 0);

    if (kind == '#') {
      size_t end = src.find("#}", p);
      if (end == std::string::npos) Fail(line, "missing end of comment tag");
      char end_sign = end > p && (src[end - 1] == '-' || src[end - 1] == '+') ? src[end - 1] : 0;
      line += CountNewlines(std::string_view(src).substr(p, end - p));
      after_tag_end(end + 2, end_sign, true);
      continue;
    }

    bool block = kind == '%';
    tokens.push_back({block ? TK::kBlockBegin : TK::kVarBegin, "", line});
    std::vector<char> brackets;
    while (true) {
      while (p < src.size() && std::isspace(static_cast<unsigned char>(src[p]))) {
        if (src[p] == '\n') ++line;
        ++p;
      }
      if (p >= src.size()) Fail(line, block ? "unexpected end of template, expected '%}'" : "unexpected end of template, expected '}}'");
      std::string_view rest = std::string_view(src).substr(p);
      if (brackets.empty()) {
        std::string_view close = block ? "%}" : "}}";
        char end_sign = 0;
        size_t len = 0;
        if ((rest[0] == '-' || (block && rest[0] == '+')) && rest.substr(1, 2) == close) { end_sign = rest[0]; len = 3; }
        else if (rest.substr(0, 2) == close) len = 2;
        if (len) {
          tokens.push_back({block ? TK::kBlockEnd : TK::kVarEnd, "", line});
          after_tag_end(p + len, end_sign, block);
          break;
        }
      }
      char c = rest[0];
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t n = 1;
        while (n < rest.size() && (std::isalnum(static_cast<unsigned char>(rest[n])) || rest[n] == '_')) ++n;
        tokens.push_back({TK::kName, std::string(rest.substr(0, n)), line});
        p += n;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t n = 0;
        bool is_float = false;
        while (n < rest.size() && (std::isdigit(static_cast<unsigned char>(rest[n])) || rest[n] == '_')) ++n;
        if (n + 1 < rest.size() && rest[n] == '.' && std::isdigit(static_cast<unsigned char>(rest[n + 1]))) {
          is_float = true;
          ++n;
          while (n < rest.size() && (std::isdigit(static_cast<unsigned char>(rest[n])) || rest[n] == '_')) ++n;
        }
        if (n < rest.size() && (rest[n] == 'e' || rest[n] == 'E')) {
          size_t m = n + 1;
          if (m < rest.size() && (rest[m] == '+' || rest[m] == '-')) ++m;
          if (m < rest.size() && std::isdigit(static_cast<unsigned char>(rest[m]))) {
            is_float = true;
            n = m;
            while (n < rest.size() && std::isdigit(static_cast<unsigned char>(rest[n]))) ++n;
          }
        }
        std::string number;
        for (char d : rest.substr(0, n)) if (d != '_') number += d;
        tokens.push_back({is_float ? TK::kFloat : TK::kInt, number, line});
        p += n;
      } else if (c == '\'' || c == '"') {
        size_t n = 1;
        while (n < rest.size() && rest[n] != c) n += rest[n] == '\\' ? 2 : 1;
        if (n >= rest.size()) Fail(line, "unterminated string literal");
        tokens.push_back({TK::kString, DecodeStringLiteral(rest.substr(1, n - 1), line), line});
        line += CountNewlines(rest.substr(0, n));
        p += n + 1;
      } else {
        static const char* kOps[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<",
                                     ">", "=", "(", ")", "[", "]", "{", "}", ",", ".", ":", "|"};
        std::string op;
        for (const char* candidate : kOps) {
          if (rest.substr(0, std::strlen(candidate)) == candidate) { op = candidate; break; }
        }
        if (op.empty()) Fail(line, std::string("unexpected char '") + c + "'");
        if (op == "(" || op == "[" || op == "{") brackets.push_back(op == "(" ? ')' : op == "[" ? ']' : '}');
        if (op == ")" || op == "]" || op == "}") {
          if (brackets.empty() || brackets.back() != op[0]) Fail(line, "unexpected '" + op + "'");
          brackets.pop_back();
        }
        tokens.push_back({TK::kOp, op, line});
        p += op.size();
      }
    }
  }
  tokens.push_back({TK::kEnd, "", line});
  return tokens;
}

// ---------------------------------------------------------------------------------
// The node tree.

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class Kind {
    kLiteral, kName, kAttr, kItem, kSlice, kCall, kMethod, kFilter, kTest,
    kNot, kNeg, kBinary, kCompare, kAnd, kOr, kCond, kList, kDict,
  };
  Kind kind;
  int line;
  std::string name;                // name, attribute, method, filter, test or operator
  Value literal;
  std::vector<ExprPtr> args;       // operands first, then call arguments (null = omitted)
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  std::vector<std::string> ops;    // a comparison chain's operators
  bool negated = false;            // `is not`
  int depth = 1;                   // of the tree it roots (at most kMaxDepth)
};

struct Node;
using NodePtr = std::unique_ptr<Node>;
using Body = std::vector<NodePtr>;

struct Node {
  enum class Kind { kText, kOutput, kIf, kFor, kSet, kSetBlock, kBreak, kContinue, kBlock };
  Kind kind;
  int line;
  std::string text;                                  // text, or the set target name
  std::string attr;                                  // `set ns.attr`
  ExprPtr expr;                                      // output, set value, for iterable
  std::vector<std::string> targets;                  // for loop variables
  std::vector<std::pair<ExprPtr, Body>> branches;    // if/elif; a null condition is else
  Body body, else_body;
};

}  // namespace

struct Program {
  Body body;
};

namespace {

// ---------------------------------------------------------------------------------
// Parser.

const std::set<std::string> kFilters = {
    "tojson", "trim", "length", "count", "default", "d", "lower", "upper", "string", "first", "last",
    "join", "replace", "capitalize", "title", "safe", "int", "float", "abs", "list", "items", "e", "escape"};
const std::set<std::string> kTests = {
    "defined", "undefined", "none", "string", "number", "integer", "float", "boolean", "true", "false",
    "mapping", "sequence", "iterable", "even", "odd", "eq", "equalto", "ne", "lt", "le", "gt", "ge", "in"};
const std::set<std::string> kFunctions = {"raise_exception", "namespace", "range", "dict"};
const std::set<std::string> kMethods = {
    "split", "rsplit", "strip", "lstrip", "rstrip", "startswith", "endswith", "lower", "upper", "replace",
    "find", "join", "title", "capitalize", "get", "items", "keys", "values"};

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : tokens_(std::move(tokens)) {}

  Body ParseTemplate() {
    return ParseBody({});
  }

 private:
  const Token& Peek(int ahead = 0) const { return tokens_[std::min(pos_ + ahead, tokens_.size() - 1)]; }
  const Token& Next() { return tokens_[std::min(pos_++, tokens_.size() - 1)]; }
  bool IsOp(const char* op, int ahead = 0) const { return Peek(ahead).kind == TK::kOp && Peek(ahead).text == op; }
  bool IsName(const char* name, int ahead = 0) const { return Peek(ahead).kind == TK::kName && Peek(ahead).text == name; }
  bool AcceptOp(const char* op) { if (IsOp(op)) { ++pos_; return true; } return false; }
  bool AcceptName(const char* name) { if (IsName(name)) { ++pos_; return true; } return false; }
  void ExpectOp(const char* op) {
    if (!AcceptOp(op)) Fail(Peek().line, std::string("expected '") + op + "', got " + Describe(Peek()));
  }
  void Expect(TK kind, const char* what) {
    if (Peek().kind != kind) Fail(Peek().line, std::string("expected ") + what + ", got " + Describe(Peek()));
    ++pos_;
  }
  std::string ExpectName() {
    if (Peek().kind != TK::kName) Fail(Peek().line, "expected a name, got " + Describe(Peek()));
    return Next().text;
  }
  static std::string Describe(const Token& t) {
    switch (t.kind) {
      case TK::kBlockEnd: return "end of statement block";
      case TK::kVarEnd: return "end of print statement";
      case TK::kEnd: return "end of template";
      default: return "'" + t.text + "'";
    }
  }

  // Parses nodes until a `{% name %}` with name in END_TAGS, leaving end_tag_ set and the
  // position after the tag name. At the top level END_TAGS is empty.
  Body ParseBody(const std::set<std::string>& end_tags) {
    const Nesting nesting(nesting_, Peek().line);
    Body body;
    while (true) {
      const Token& t = Peek();
      if (t.kind == TK::kEnd) {
        for (const auto& tag : end_tags) {
          if (tag.starts_with("end")) Fail(t.line, "unexpected end of template, missing '{% " + tag + " %}'");
        }
        return body;
      }
      auto node = std::make_unique<Node>();
      node->line = t.line;
      if (t.kind == TK::kData) {
        node->kind = Node::Kind::kText;
        node->text = t.text;
        ++pos_;
      } else if (t.kind == TK::kVarBegin) {
        ++pos_;
        node->kind = Node::Kind::kOutput;
        node->expr = ParseExpression();
        Expect(TK::kVarEnd, "'}}'");
      } else {
        ++pos_;
        const Token& tag = Peek();
        if (tag.kind != TK::kName) Fail(tag.line, "expected a tag name, got " + Describe(tag));
        if (end_tags.count(tag.text)) {
          end_tag_ = tag.text;
          ++pos_;
          return body;
        }
        if (tag.text.starts_with("end") || tag.text == "elif" || tag.text == "else") {
          Fail(tag.line, "unexpected tag '" + tag.text + "'");
        }
        node = ParseStatement();
      }
      body.push_back(std::move(node));
    }
  }

  NodePtr ParseStatement() {
    const Token& tag = Next();
    auto node = std::make_unique<Node>();
    node->line = tag.line;
    if (tag.text == "if") {
      node->kind = Node::Kind::kIf;
      ExprPtr cond = ParseExpression();
      while (true) {
        Expect(TK::kBlockEnd, "'%}'");
        Body body = ParseBody({"elif", "else", "endif"});
        node->branches.emplace_back(std::move(cond), std::move(body));
        if (end_tag_ == "elif") { cond = ParseExpression(); continue; }
        if (end_tag_ == "else") {
          Expect(TK::kBlockEnd, "'%}'");
          node->branches.emplace_back(nullptr, ParseBody({"endif"}));
        }
        break;
      }
    } else if (tag.text == "for") {
      node->kind = Node::Kind::kFor;
      do node->targets.push_back(ExpectName()); while (AcceptOp(","));
      if (!AcceptName("in")) Fail(Peek().line, "expected 'in', got " + Describe(Peek()));
      node->expr = ParseExpression(/*allow_conditional=*/false);
      if (IsName("if")) Fail(Peek().line, "unsupported construct 'for ... if' (loop filter)");
      if (IsName("recursive")) Fail(Peek().line, "unsupported construct 'recursive' loop");
      Expect(TK::kBlockEnd, "'%}'");
      node->body = ParseBody({"else", "endfor"});
      if (end_tag_ == "else") {
        Expect(TK::kBlockEnd, "'%}'");
        node->else_body = ParseBody({"endfor"});
      }
    } else if (tag.text == "set") {
      node->text = ExpectName();
      if (AcceptOp(".")) node->attr = ExpectName();
      if (IsOp(",")) Fail(Peek().line, "unsupported construct 'set' with several targets");
      if (AcceptOp("=")) {
        node->kind = Node::Kind::kSet;
        node->expr = ParseExpression();
      } else {
        if (!node->attr.empty()) Fail(tag.line, "unsupported construct block 'set' of a namespace attribute");
        if (IsOp("|")) Fail(Peek().line, "unsupported construct 'set' block with a filter");
        node->kind = Node::Kind::kSetBlock;
        Expect(TK::kBlockEnd, "'%}'");
        node->body = ParseBody({"endset"});
      }
    } else if (tag.text == "break" || tag.text == "continue") {
      node->kind = tag.text == "break" ? Node::Kind::kBreak : Node::Kind::kContinue;
    } else if (tag.text == "generation") {
      // transformers' AssistantTracker marks assistant text; rendering is unaffected.
      node->kind = Node::Kind::kBlock;
      Expect(TK::kBlockEnd, "'%}'");
      node->body = ParseBody({"endgeneration"});
    } else {
      Fail(tag.line, "unsupported tag '" + tag.text + "'");
    }
    Expect(TK::kBlockEnd, "'%}'");
    return node;
  }

  // CHILD (may be null) as the next operand of PARENT, which grows as deep as it needs.
  void Deepen(Expr& parent, const Expr& child) {
    parent.depth = std::max(parent.depth, child.depth + 1);
    if (parent.depth > kMaxDepth) Fail(parent.line, "expression nested more than " + std::to_string(kMaxDepth) + " deep");
  }
  void Adopt(Expr& parent, ExprPtr child) {
    if (child) Deepen(parent, *child);
    parent.args.push_back(std::move(child));
  }
  // Counts a level of the parser's recursion while in scope.
  class Nesting {
   public:
    Nesting(int& depth, int line) : depth_(depth) {
      if (++depth_ > kMaxDepth) Fail(line, "nested more than " + std::to_string(kMaxDepth) + " deep");
    }
    ~Nesting() { --depth_; }
    Nesting(const Nesting&) = delete;
    Nesting& operator=(const Nesting&) = delete;

   private:
    int& depth_;
  };

  ExprPtr Make(Expr::Kind kind, int line, std::string name = {}) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = line;
    e->name = std::move(name);
    return e;
  }

  ExprPtr ParseExpression(bool allow_conditional = true) {
    const Nesting nesting(nesting_, Peek().line);
    ExprPtr e = ParseOr();
    while (allow_conditional && IsName("if")) {
      auto cond = Make(Expr::Kind::kCond, Next().line);
      ExprPtr test = ParseOr();
      ExprPtr otherwise = AcceptName("else") ? ParseExpression() : nullptr;
      Adopt(*cond, std::move(test));
      Adopt(*cond, std::move(e));
      Adopt(*cond, std::move(otherwise));
      e = std::move(cond);
    }
    return e;
  }

  ExprPtr ParseOr() {
    ExprPtr e = ParseAnd();
    while (IsName("or")) {
      auto n = Make(Expr::Kind::kOr, Next().line);
      Adopt(*n, std::move(e));
      Adopt(*n, ParseAnd());
      e = std::move(n);
    }
    return e;
  }

  ExprPtr ParseAnd() {
    ExprPtr e = ParseNot();
    while (IsName("and")) {
      auto n = Make(Expr::Kind::kAnd, Next().line);
      Adopt(*n, std::move(e));
      Adopt(*n, ParseNot());
      e = std::move(n);
    }
    return e;
  }

  ExprPtr ParseNot() {
    if (IsName("not")) {
      const Nesting nesting(nesting_, Peek().line);
      auto n = Make(Expr::Kind::kNot, Next().line);
      Adopt(*n, ParseNot());
      return n;
    }
    return ParseCompare();
  }

  ExprPtr ParseCompare() {
    ExprPtr e = ParseMath1();
    ExprPtr chain;
    while (true) {
      std::string op;
      if (Peek().kind == TK::kOp && (IsOp("==") || IsOp("!=") || IsOp("<") || IsOp(">") || IsOp("<=") || IsOp(">="))) {
        op = Next().text;
      } else if (IsName("in")) {
        op = Next().text;
      } else if (IsName("not") && IsName("in", 1)) {
        pos_ += 2;
        op = "not in";
      } else {
        break;
      }
      if (!chain) {
        chain = Make(Expr::Kind::kCompare, e->line);
        Adopt(*chain, std::move(e));
      }
      chain->ops.push_back(op);
      Adopt(*chain, ParseMath1());
    }
    return chain ? std::move(chain) : std::move(e);
  }

  ExprPtr Binary(std::string op, ExprPtr left, ExprPtr right, int line) {
    auto n = Make(Expr::Kind::kBinary, line, std::move(op));
    Adopt(*n, std::move(left));
    Adopt(*n, std::move(right));
    return n;
  }

  ExprPtr ParseMath1() {
    ExprPtr e = ParseConcat();
    while (IsOp("+") || IsOp("-")) {
      const Token& t = Next();
      e = Binary(t.text, std::move(e), ParseConcat(), t.line);
    }
    return e;
  }

  ExprPtr ParseConcat() {
    ExprPtr e = ParseMath2();
    while (IsOp("~")) {
      const Token& t = Next();
      e = Binary("~", std::move(e), ParseMath2(), t.line);
    }
    return e;
  }

  ExprPtr ParseMath2() {
    ExprPtr e = ParsePow();
    while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) {
      const Token& t = Next();
      e = Binary(t.text, std::move(e), ParsePow(), t.line);
    }
    return e;
  }

  ExprPtr ParsePow() {
    ExprPtr e = ParseUnary(true);
    while (IsOp("**")) {
      const Token& t = Next();
      e = Binary("**", std::move(e), ParseUnary(true), t.line);
    }
    return e;
  }

  ExprPtr ParseUnary(bool with_filter) {
    ExprPtr e;
    if (IsOp("-")) {
      const Nesting nesting(nesting_, Peek().line);
      e = Make(Expr::Kind::kNeg, Next().line);
      Adopt(*e, ParseUnary(false));
    } else if (IsOp("+")) {
      const Nesting nesting(nesting_, Next().line);
      e = ParseUnary(false);
    } else {
      e = ParsePrimary();
    }
    e = ParsePostfix(std::move(e));
    return with_filter ? ParseFilterTest(std::move(e)) : std::move(e);
  }

  ExprPtr ParsePrimary() {
    const Token& t = Next();
    switch (t.kind) {
      case TK::kName: {
        auto lit = [&](Value v) { auto e = Make(Expr::Kind::kLiteral, t.line); e->literal = std::move(v); return e; };
        if (t.text == "true" || t.text == "True") return lit(Value::Bool(true));
        if (t.text == "false" || t.text == "False") return lit(Value::Bool(false));
        if (t.text == "none" || t.text == "None") return lit(Value::None());
        return Make(Expr::Kind::kName, t.line, t.text);
      }
      case TK::kString: {
        std::string s = t.text;
        while (Peek().kind == TK::kString) s += Next().text;  // adjacent literals concatenate
        auto e = Make(Expr::Kind::kLiteral, t.line);
        e->literal = Value::Str(std::move(s));
        return e;
      }
      case TK::kInt: case TK::kFloat: {
        auto e = Make(Expr::Kind::kLiteral, t.line);
        if (t.kind == TK::kFloat) {
          e->literal = Value::Float(std::strtod(t.text.c_str(), nullptr));
        } else {
          int64_t v = 0;
          auto [ptr, ec] = std::from_chars(t.text.data(), t.text.data() + t.text.size(), v);
          if (ec != std::errc()) Fail(t.line, "integer literal out of range");
          e->literal = Value::Int(v);
        }
        return e;
      }
      case TK::kOp:
        if (t.text == "(") {
          if (AcceptOp(")")) Fail(t.line, "unsupported construct: empty tuple");
          ExprPtr e = ParseExpression();
          if (IsOp(",")) {
            auto list = Make(Expr::Kind::kList, t.line, "tuple");
            Adopt(*list, std::move(e));
            while (AcceptOp(",") && !IsOp(")")) Adopt(*list, ParseExpression());
            e = std::move(list);
          }
          ExpectOp(")");
          return e;
        }
        if (t.text == "[") {
          auto list = Make(Expr::Kind::kList, t.line);
          while (!IsOp("]")) {
            Adopt(*list, ParseExpression());
            if (!AcceptOp(",")) break;
          }
          ExpectOp("]");
          return list;
        }
        if (t.text == "{") {
          auto dict = Make(Expr::Kind::kDict, t.line);
          while (!IsOp("}")) {
            Adopt(*dict, ParseExpression());
            ExpectOp(":");
            Adopt(*dict, ParseExpression());
            if (!AcceptOp(",")) break;
          }
          ExpectOp("}");
          return dict;
        }
        [[fallthrough]];
      default:
        Fail(t.line, "unexpected " + Describe(t));
    }
  }

  void ParseCallArgs(Expr& call) {
    while (!IsOp(")")) {
      if (Peek().kind == TK::kName && IsOp("=", 1)) {
        std::string key = Next().text;
        ++pos_;
        ExprPtr value = ParseExpression();
        Deepen(call, *value);
        call.kwargs.emplace_back(key, std::move(value));
      } else {
        if (!call.kwargs.empty()) Fail(Peek().line, "positional argument follows keyword argument");
        Adopt(call, ParseExpression());
      }
      if (!AcceptOp(",")) break;
    }
    ExpectOp(")");
  }

  ExprPtr ParsePostfix(ExprPtr e) {
    while (true) {
      if (IsOp(".")) {
        int line = Next().line;
        std::string name;
        if (Peek().kind == TK::kInt) name = Next().text;
        else name = ExpectName();
        if (IsOp("(")) {
          ++pos_;
          if (!kMethods.count(name)) Fail(line, "unsupported method '" + name + "'");
          auto call = Make(Expr::Kind::kMethod, line, name);
          Adopt(*call, std::move(e));
          ParseCallArgs(*call);
          e = std::move(call);
        } else {
          auto attr = Make(Expr::Kind::kAttr, line, name);
          Adopt(*attr, std::move(e));
          e = std::move(attr);
        }
      } else if (IsOp("[")) {
        int line = Next().line;
        ExprPtr parts[3];
        bool slice = false;
        for (int k = 0; k < 3; ++k) {
          if (!IsOp(":") && !IsOp("]")) parts[k] = ParseExpression();
          if (k < 2 && AcceptOp(":")) { slice = true; continue; }
          break;
        }
        ExpectOp("]");
        if (!slice && !parts[0]) Fail(line, "expected an index inside '[]'");  // `x[]` (found by fuzzing)
        auto n = Make(slice ? Expr::Kind::kSlice : Expr::Kind::kItem, line);
        Adopt(*n, std::move(e));
        for (auto& part : parts) Adopt(*n, std::move(part));
        if (!slice) n->args.resize(2);
        e = std::move(n);
      } else if (IsOp("(")) {
        int line = Next().line;
        if (e->kind != Expr::Kind::kName) Fail(line, "unsupported call of an expression");
        if (!kFunctions.count(e->name)) Fail(line, "unsupported function '" + e->name + "'");
        auto call = Make(Expr::Kind::kCall, line, e->name);
        ParseCallArgs(*call);
        e = std::move(call);
      } else {
        return e;
      }
    }
  }

  ExprPtr ParseFilterTest(ExprPtr e) {
    while (true) {
      if (IsOp("|")) {
        int line = Next().line;
        std::string name = ExpectName();
        if (!kFilters.count(name)) Fail(line, "unsupported filter '" + name + "'");
        auto f = Make(Expr::Kind::kFilter, line, name);
        Adopt(*f, std::move(e));
        if (AcceptOp("(")) ParseCallArgs(*f);
        e = std::move(f);
      } else if (IsName("is")) {
        int line = Next().line;
        bool negated = AcceptName("not");
        std::string name = Peek().kind == TK::kName ? Next().text : "";
        if (name.empty()) Fail(line, "expected a test name, got " + Describe(Peek()));
        if (!kTests.count(name)) Fail(line, "unsupported test '" + name + "'");
        auto t = Make(Expr::Kind::kTest, line, name);
        t->negated = negated;
        Adopt(*t, std::move(e));
        if (AcceptOp("(")) {
          ParseCallArgs(*t);
        } else if ((Peek().kind == TK::kName || Peek().kind == TK::kString || Peek().kind == TK::kInt ||
                    Peek().kind == TK::kFloat || IsOp("[") || IsOp("{")) &&
                   !IsName("else") && !IsName("or") && !IsName("and")) {
          // `x is eq 3`: one argument without parentheses, as jinja2 parses it.
          if (IsName("is")) Fail(Peek().line, "you cannot chain multiple tests with is");
          Adopt(*t, ParsePostfix(ParsePrimary()));
        }
        e = std::move(t);
      } else {
        return e;
      }
    }
  }

  std::vector<Token> tokens_;
  size_t pos_ = 0;
  std::string end_tag_;
  int nesting_ = 0;  // levels of the parser's recursion (Nesting)
};

// ---------------------------------------------------------------------------------
// Evaluator.

enum class Flow { kNormal, kBreak, kContinue };

class Renderer {
 public:
  explicit Renderer(const json& context) {
    if (!context.is_object()) Fail(0, "the context must be a JSON object");
    for (const auto& [k, v] : context.items()) globals_[k] = FromJson(v);
    scopes_.emplace_back();
  }

  Flow Run(const Body& body, std::string& out) {
    for (const auto& node : body) {
      Flow flow = Exec(*node, out);
      if (flow != Flow::kNormal) return flow;
    }
    return Flow::kNormal;
  }

 private:
  Flow Exec(const Node& n, std::string& out) {
    try {
      return ExecNode(n, out);
    } catch (TemplateError& e) {
      if (e.line == 0) e.line = n.line;  // a value too deep (Value::Contain) is this statement's
      throw;
    }
  }

  Flow ExecNode(const Node& n, std::string& out) {
    switch (n.kind) {
      case Node::Kind::kText:
        out += n.text;
        CheckStringSize(out.size(), n.line);
        return Flow::kNormal;
      case Node::Kind::kOutput:
        out += Str(Eval(*n.expr));
        CheckStringSize(out.size(), n.line);
        return Flow::kNormal;
      case Node::Kind::kIf:
        for (const auto& [cond, body] : n.branches) {
          if (!cond || Truthy(Eval(*cond))) return Run(body, out);
        }
        return Flow::kNormal;
      case Node::Kind::kFor: return ExecFor(n, out);
      case Node::Kind::kSet: {
        Value v = Eval(*n.expr);
        if (n.attr.empty()) {
          scopes_.back()[n.text] = std::move(v);
          return Flow::kNormal;
        }
        Value target = Lookup(n.text, n.line);
        if (target.type != Type::kNamespace) Fail(n.line, "can only assign attributes of a namespace, not of '" + n.text + "'");
        // Nothing a namespace holds holds a namespace, so none can come to hold itself.
        if (v.type == Type::kNamespace || v.holds_namespace) Fail(n.line, "a namespace cannot hold a namespace");
        if (v.depth + 1 > kMaxDepth) Fail(n.line, "a value nested more than " + std::to_string(kMaxDepth) + " deep");
        for (auto& [k, e] : *target.dict) {
          if (k == n.attr) { e = std::move(v); return Flow::kNormal; }
        }
        target.dict->emplace_back(n.attr, std::move(v));
        return Flow::kNormal;
      }
      case Node::Kind::kSetBlock: {
        std::string captured;
        Run(n.body, captured);
        scopes_.back()[n.text] = Value::Str(std::move(captured));
        return Flow::kNormal;
      }
      case Node::Kind::kBreak: return Flow::kBreak;
      case Node::Kind::kContinue: return Flow::kContinue;
      case Node::Kind::kBlock: return Run(n.body, out);
    }
    return Flow::kNormal;
  }

  Flow ExecFor(const Node& n, std::string& out) {
    List items = Iterate(Eval(*n.expr), n.line);
    if (items.empty()) return Run(n.else_body, out);
    const int64_t length = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < length; ++k) {
      if (++iterations_ > kMaxIterations) Fail(n.line, "more than " + std::to_string(kMaxIterations) + " loop iterations");
      // Each iteration is a scope of its own: a `set` inside the loop does not leak out.
      scopes_.emplace_back();
      auto& scope = scopes_.back();
      if (n.targets.size() == 1) {
        scope[n.targets[0]] = items[k];
      } else {
        List parts = Iterate(items[k], n.line);
        if (parts.size() != n.targets.size()) Fail(n.line, "cannot unpack loop item into " + std::to_string(n.targets.size()) + " names");
        for (size_t t = 0; t < parts.size(); ++t) scope[n.targets[t]] = parts[t];
      }
      Dict loop = {{"index", Value::Int(k + 1)}, {"index0", Value::Int(k)},
                   {"revindex", Value::Int(length - k)}, {"revindex0", Value::Int(length - k - 1)},
                   {"first", Value::Bool(k == 0)}, {"last", Value::Bool(k == length - 1)},
                   {"length", Value::Int(length)}, {"depth", Value::Int(1)}, {"depth0", Value::Int(0)}};
      if (k > 0) loop.emplace_back("previtem", items[k - 1]);
      if (k + 1 < length) loop.emplace_back("nextitem", items[k + 1]);
      scope["loop"] = Value::MakeDict(std::move(loop));
      Flow flow = Run(n.body, out);
      scopes_.pop_back();
      if (flow == Flow::kBreak) break;
    }
    return Flow::kNormal;
  }

  Value Lookup(const std::string& name, int) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto found = it->find(name);
      if (found != it->end()) return found->second;
    }
    auto found = globals_.find(name);
    return found != globals_.end() ? found->second : Value::Undefined(name);
  }

  // jinja2's getattr/getitem: a missing key, index or attribute is undefined, but any
  // lookup on an undefined value is an error.
  Value Item(const Value& obj, const Value& key, int line) {
    if (obj.undefined()) FailUndefined(obj, line);
    std::string hint = key.type == Type::kString ? key.s : Str(key);
    if ((obj.type == Type::kDict || obj.type == Type::kNamespace) && key.type == Type::kString) {
      const Value* v = obj.Find(key.s);
      return v ? *v : Value::Undefined(hint);
    }
    if ((obj.type == Type::kList || obj.type == Type::kString) && (key.type == Type::kInt || key.type == Type::kBool)) {
      std::u32string chars;
      int64_t size;
      if (obj.type == Type::kString) { chars = Decode(obj.s); size = static_cast<int64_t>(chars.size()); }
      else size = static_cast<int64_t>(obj.list->size());
      int64_t idx = key.AsInt();
      if (idx < 0) idx += size;
      if (idx < 0 || idx >= size) return Value::Undefined(hint);
      return obj.type == Type::kList ? (*obj.list)[idx] : Value::Str(Encode(chars.substr(idx, 1)));
    }
    return Value::Undefined(hint);
  }

  Value Slice(const Value& obj, const Value* parts[3], int line) {
    if (obj.undefined()) FailUndefined(obj, line);
    if (obj.type != Type::kList && obj.type != Type::kString) return Value::Undefined("slice");
    std::u32string chars;
    int64_t size;
    if (obj.type == Type::kString) { chars = Decode(obj.s); size = static_cast<int64_t>(chars.size()); }
    else size = static_cast<int64_t>(obj.list->size());
    auto get = [&](int k, bool* given) -> int64_t {
      *given = parts[k] && parts[k]->type != Type::kNone;
      if (!*given) return 0;
      if (parts[k]->type != Type::kInt && parts[k]->type != Type::kBool) Fail(line, "slice indices must be integers or None");
      return parts[k]->AsInt();
    };
    bool has_start, has_stop, has_step;
    int64_t start = get(0, &has_start), stop = get(1, &has_stop), step = get(2, &has_step);
    if (!has_step) step = 1;
    if (step == 0) Fail(line, "slice step cannot be zero");
    // Python's slice.indices().
    auto clamp = [&](int64_t v, bool given, int64_t dflt) {
      if (!given) return dflt;
      if (v < 0) v += size;
      if (step > 0) return std::clamp<int64_t>(v, 0, size);
      return std::clamp<int64_t>(v, -1, size - 1);
    };
    start = clamp(start, has_start, step > 0 ? 0 : size - 1);
    stop = clamp(stop, has_stop, step > 0 ? size : -1);
    List list;
    std::u32string str;
    for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
      if (obj.type == Type::kList) list.push_back((*obj.list)[k]);
      else str.push_back(chars[k]);
    }
    return obj.type == Type::kList ? Value::MakeList(std::move(list)) : Value::Str(Encode(str));
  }

  Value Arith(const std::string& op, const Value& a, const Value& b, int line) {
    if (op == "~") {
      std::string l = Str(a), r = Str(b);
      CheckStringSize(l.size() + r.size(), line);
      return Value::Str(l + r);
    }
    if (a.undefined()) FailUndefined(a, line);
    if (b.undefined()) FailUndefined(b, line);
    auto unsupported = [&]() -> Value {
      Fail(line, "unsupported operand type(s) for " + op + ": '" + TypeName(a) + "' and '" + TypeName(b) + "'");
    };
    if (a.numeric() && b.numeric()) {
      bool floats = a.type == Type::kFloat || b.type == Type::kFloat;
      if (op == "/") {
        if (b.AsDouble() == 0) Fail(line, "division by zero");
        return Value::Float(a.AsDouble() / b.AsDouble());
      }
      if (op == "**") {
        if (!floats && b.AsInt() >= 0) {
          // Python's ints do not overflow; epic's do, and say so. |base| <= 1 never
          // overflows, so it is not looped over (the exponent may be huge).
          const int64_t base = a.AsInt(), exponent = b.AsInt();
          if (base == 0) return Value::Int(exponent == 0 ? 1 : 0);
          if (base == 1) return Value::Int(1);
          if (base == -1) return Value::Int(exponent % 2 == 0 ? 1 : -1);
          int64_t r = 1;
          for (int64_t k = 0; k < exponent; ++k) {
            if (__builtin_mul_overflow(r, base, &r)) Fail(line, "integer overflow in **");
          }
          return Value::Int(r);
        }
        return Value::Float(std::pow(a.AsDouble(), b.AsDouble()));
      }
      if (floats) {
        double x = a.AsDouble(), y = b.AsDouble();
        if (op == "+") return Value::Float(x + y);
        if (op == "-") return Value::Float(x - y);
        if (op == "*") return Value::Float(x * y);
        if (y == 0) Fail(line, "float division by zero");
        if (op == "//") return Value::Float(std::floor(x / y));
        double m = std::fmod(x, y);
        return Value::Float(m != 0 && ((m < 0) != (y < 0)) ? m + y : m);
      }
      int64_t x = a.AsInt(), y = b.AsInt(), r = 0;
      const bool overflow = op == "+"   ? __builtin_add_overflow(x, y, &r)
                            : op == "-" ? __builtin_sub_overflow(x, y, &r)
                            : op == "*" ? __builtin_mul_overflow(x, y, &r)
                                        : x == std::numeric_limits<int64_t>::min() && y == -1;
      if (overflow) Fail(line, "integer overflow in " + op);
      if (op == "+" || op == "-" || op == "*") return Value::Int(r);
      if (y == 0) Fail(line, "integer division or modulo by zero");
      int64_t q = x / y, m = x % y;
      if (m != 0 && ((m < 0) != (y < 0))) { --q; m += y; }
      return Value::Int(op == "//" ? q : m);
    }
    if (op == "+" && a.type == Type::kString && b.type == Type::kString) {
      CheckStringSize(a.s.size() + b.s.size(), line);
      return Value::Str(a.s + b.s);
    }
    if (op == "+" && a.type == Type::kList && b.type == Type::kList) {
      if (a.list->size() + b.list->size() > static_cast<size_t>(kMaxIterations)) Fail(line, "a list too long");
      List l = *a.list;
      l.insert(l.end(), b.list->begin(), b.list->end());
      return Value::MakeList(std::move(l));
    }
    if (op == "*" && (a.type == Type::kString || a.type == Type::kList) && (b.type == Type::kInt || b.type == Type::kBool)) {
      Value r = a.type == Type::kString ? Value::Str("") : Value::MakeList({});
      List l;
      const size_t size = a.type == Type::kString ? a.s.size() : a.list->size();
      const int64_t times = size == 0 ? 0 : b.AsInt();  // an empty one stays empty, however many times
      const size_t most = a.type == Type::kString ? kMaxStringBytes : static_cast<size_t>(kMaxIterations);
      if (times > 0 && static_cast<uint64_t>(times) > most / size) {
        Fail(line, std::string("a ") + (a.type == Type::kString ? "string" : "list") + " too long");
      }
      for (int64_t k = 0; k < times; ++k) {
        if (a.type == Type::kString) r.s += a.s;
        else l.insert(l.end(), a.list->begin(), a.list->end());
      }
      return a.type == Type::kString ? r : Value::MakeList(std::move(l));
    }
    if (op == "*" && (b.type == Type::kString || b.type == Type::kList) && (a.type == Type::kInt || a.type == Type::kBool)) {
      return Arith(op, b, a, line);
    }
    return unsupported();
  }

  bool Contains(const Value& container, const Value& item, int line) {
    switch (container.type) {
      case Type::kString:
        if (item.type != Type::kString) Fail(line, std::string("'in <string>' requires string as left operand, not ") + TypeName(item));
        return container.s.find(item.s) != std::string::npos;
      case Type::kList:
        return std::any_of(container.list->begin(), container.list->end(), [&](const Value& v) { return Equal(v, item); });
      case Type::kDict: return item.type == Type::kString && container.Find(item.s);
      case Type::kUndefined: return false;
      default: Fail(line, std::string("argument of type '") + TypeName(container) + "' is not iterable");
    }
  }

  bool CompareOp(const std::string& op, const Value& a, const Value& b, int line) {
    if (op == "==") return Equal(a, b);
    if (op == "!=") return !Equal(a, b);
    if (op == "in") return Contains(b, a, line);
    if (op == "not in") return !Contains(b, a, line);
    int c = Compare(a, b, line);
    if (op == "<") return c < 0;
    if (op == ">") return c > 0;
    if (op == "<=") return c <= 0;
    return c >= 0;
  }

  // Positional and keyword arguments, bound to NAMES in order; DEFAULTS fill the rest.
  std::vector<Value> Bind(const Expr& e, size_t first_arg, const std::vector<std::string>& names,
                          std::vector<Value> defaults) {
    std::vector<Value> out = std::move(defaults);
    out.resize(names.size());
    size_t positional = e.args.size() - first_arg;
    if (positional > names.size()) Fail(e.line, "too many arguments to '" + e.name + "'");
    for (size_t k = 0; k < positional; ++k) out[k] = Eval(*e.args[first_arg + k]);
    for (const auto& [key, arg] : e.kwargs) {
      auto it = std::find(names.begin(), names.end(), key);
      if (it == names.end()) Fail(e.line, "unexpected keyword argument '" + key + "' to '" + e.name + "'");
      out[it - names.begin()] = Eval(*arg);
    }
    return out;
  }

  std::string RequireString(const Value& v, const Expr& e) {
    if (v.type != Type::kString) Fail(e.line, "'" + e.name + "' expects a string, got '" + TypeName(v) + "'");
    return v.s;
  }

  Value CallFunction(const Expr& e) {
    if (e.name == "raise_exception") {
      auto args = Bind(e, 0, {"message"}, {Value::Str("")});
      throw TemplateError{e.line, Str(args[0])};
    }
    if (e.name == "namespace" || e.name == "dict") {
      Dict attrs;
      if (!e.args.empty()) {
        Value init = Eval(*e.args[0]);
        if (init.type != Type::kDict) Fail(e.line, "'" + e.name + "' expects keyword arguments or a dict");
        attrs = *init.dict;
      }
      for (const auto& [key, arg] : e.kwargs) {
        Value v = Eval(*arg);
        auto it = std::find_if(attrs.begin(), attrs.end(), [&key = key](const auto& kv) { return kv.first == key; });
        if (it != attrs.end()) it->second = std::move(v);
        else attrs.emplace_back(key, std::move(v));
      }
      return Value::MakeDict(std::move(attrs), e.name == "namespace" ? Type::kNamespace : Type::kDict);
    }
    // range
    std::vector<int64_t> bounds;
    for (const auto& arg : e.args) {
      Value v = Eval(*arg);
      if (v.type != Type::kInt && v.type != Type::kBool) Fail(e.line, "range() expects integers");
      bounds.push_back(v.AsInt());
    }
    if (bounds.empty() || bounds.size() > 3 || !e.kwargs.empty()) Fail(e.line, "range() expects 1 to 3 integers");
    int64_t start = bounds.size() > 1 ? bounds[0] : 0, stop = bounds.size() > 1 ? bounds[1] : bounds[0];
    int64_t step = bounds.size() > 2 ? bounds[2] : 1;
    if (step == 0) Fail(e.line, "range() arg 3 must not be zero");
    List l;
    for (int64_t k = start; step > 0 ? k < stop : k > stop;) {
      l.push_back(Value::Int(k));
      if (static_cast<int64_t>(l.size()) > kMaxIterations) Fail(e.line, "range too big");
      if (__builtin_add_overflow(k, step, &k)) break;  // past every stop
    }
    return Value::MakeList(std::move(l));
  }

  Value CallMethod(const Expr& e) {
    Value obj = Eval(*e.args[0]);
    if (obj.undefined()) FailUndefined(obj, e.line);
    const std::string& m = e.name;
    if (obj.type == Type::kDict) {
      if (m == "get") {
        auto a = Bind(e, 1, {"key", "default"}, {Value::None(), Value::None()});
        const Value* v = a[0].type == Type::kString ? obj.Find(a[0].s) : nullptr;
        return v ? *v : a[1];
      }
      List l;
      for (const auto& [k, v] : *obj.dict) {
        if (m == "keys") l.push_back(Value::Str(k));
        else if (m == "values") l.push_back(v);
        else if (m == "items") l.push_back(Value::MakeList({Value::Str(k), v}, /*tuple=*/true));
        else Fail(e.line, "'dict' object has no method '" + m + "'");
      }
      return Value::MakeList(std::move(l));
    }
    if (obj.type != Type::kString) Fail(e.line, std::string("'") + TypeName(obj) + "' object has no method '" + m + "'");
    const std::string& s = obj.s;
    if (m == "strip" || m == "lstrip" || m == "rstrip") {
      auto a = Bind(e, 1, {"chars"}, {Value::None()});
      std::u32string chars = a[0].type == Type::kString ? Decode(a[0].s) : U"";
      return Value::Str(StripChars(s, a[0].type == Type::kString ? &chars : nullptr, m != "rstrip", m != "lstrip"));
    }
    if (m == "split" || m == "rsplit") {
      auto a = Bind(e, 1, {"sep", "maxsplit"}, {Value::None(), Value::Int(-1)});
      int64_t maxsplit = a[1].AsInt();
      List parts;
      if (a[0].type == Type::kNone) {
        // Runs of whitespace separate; leading and trailing whitespace yields nothing.
        std::u32string u = Decode(s);
        std::vector<std::pair<size_t, size_t>> words;
        for (size_t k = 0; k < u.size();) {
          while (k < u.size() && IsSpace(u[k])) ++k;
          if (k == u.size()) break;
          size_t b = k;
          while (k < u.size() && !IsSpace(u[k])) ++k;
          words.emplace_back(b, k);
        }
        if (maxsplit >= 0 && static_cast<int64_t>(words.size()) > maxsplit + 1) {
          if (m == "split") {
            size_t tail = words[maxsplit].first;
            words.resize(maxsplit);
            size_t end = u.size();
            while (end > tail && IsSpace(u[end - 1])) --end;
            words.emplace_back(tail, end);
          } else {
            size_t head = words[words.size() - maxsplit - 1].second;
            words.erase(words.begin(), words.end() - maxsplit);
            size_t b = 0;
            while (b < head && IsSpace(u[b])) ++b;
            words.insert(words.begin(), {b, head});
          }
        }
        for (auto [b, k] : words) parts.push_back(Value::Str(Encode(std::u32string_view(u).substr(b, k - b))));
        return Value::MakeList(std::move(parts));
      }
      std::string sep = RequireString(a[0], e);
      if (sep.empty()) Fail(e.line, "empty separator");
      std::vector<std::string> pieces;
      size_t start = 0;
      for (size_t found; (found = s.find(sep, start)) != std::string::npos;) {
        pieces.push_back(s.substr(start, found - start));
        start = found + sep.size();
      }
      pieces.push_back(s.substr(start));
      if (maxsplit >= 0 && static_cast<int64_t>(pieces.size()) > maxsplit + 1) {
        std::vector<std::string> merged;
        if (m == "split") {
          merged.assign(pieces.begin(), pieces.begin() + maxsplit);
          std::string tail = pieces[maxsplit];
          for (size_t k = maxsplit + 1; k < pieces.size(); ++k) tail += sep + pieces[k];
          merged.push_back(tail);
        } else {
          size_t keep = pieces.size() - maxsplit;
          std::string head = pieces[0];
          for (size_t k = 1; k < keep; ++k) head += sep + pieces[k];
          merged.push_back(head);
          merged.insert(merged.end(), pieces.begin() + keep, pieces.end());
        }
        pieces = std::move(merged);
      }
      for (auto& p : pieces) parts.push_back(Value::Str(std::move(p)));
      return Value::MakeList(std::move(parts));
    }
    if (m == "startswith" || m == "endswith") {
      auto a = Bind(e, 1, {"prefix"}, {});
      List options = a[0].type == Type::kList ? *a[0].list : List{a[0]};
      for (const auto& o : options) {
        std::string p = RequireString(o, e);
        if (p.size() <= s.size() && (m == "startswith" ? s.compare(0, p.size(), p) : s.compare(s.size() - p.size(), p.size(), p)) == 0) {
          return Value::Bool(true);
        }
      }
      return Value::Bool(false);
    }
    if (m == "lower" || m == "upper" || m == "title" || m == "capitalize") return ChangeCase(m, s);
    if (m == "replace") {
      auto a = Bind(e, 1, {"old", "new", "count"}, {Value::None(), Value::None(), Value::Int(-1)});
      return Value::Str(Replace(s, RequireString(a[0], e), RequireString(a[1], e), a[2].AsInt()));
    }
    if (m == "find") {
      auto a = Bind(e, 1, {"sub"}, {});
      size_t at = s.find(RequireString(a[0], e));
      return Value::Int(at == std::string::npos ? -1 : static_cast<int64_t>(Decode(s.substr(0, at)).size()));
    }
    // join
    auto a = Bind(e, 1, {"iterable"}, {});
    std::string out;
    List items = Iterate(a[0], e.line);
    for (size_t k = 0; k < items.size(); ++k) {
      if (items[k].type != Type::kString) Fail(e.line, "sequence item " + std::to_string(k) + ": expected str instance");
      out += (k ? s : "") + items[k].s;
    }
    return Value::Str(out);
  }

  static std::string Replace(const std::string& s, const std::string& from, const std::string& to, int64_t count) {
    std::string out;
    if (from.empty()) {  // Python inserts TO between every character
      std::u32string u = Decode(s);
      int64_t done = 0;
      for (size_t k = 0; k <= u.size(); ++k) {
        if (count < 0 || done < count) { out += to; ++done; }
        if (k < u.size()) AppendUtf8(out, u[k]);
      }
      return out;
    }
    size_t start = 0;
    for (int64_t done = 0; count < 0 || done < count; ++done) {
      size_t found = s.find(from, start);
      if (found == std::string::npos) break;
      out += s.substr(start, found - start) + to;
      start = found + from.size();
    }
    return out + s.substr(start);
  }

  // ASCII case mapping; other scripts pass through unchanged.
  static Value ChangeCase(const std::string& how, const std::string& s) {
    std::string out = s;
    bool word_start = true;
    for (size_t k = 0; k < out.size(); ++k) {
      unsigned char c = out[k];
      bool alpha = std::isalpha(c);
      if (how == "lower") out[k] = std::tolower(c);
      else if (how == "upper") out[k] = std::toupper(c);
      else if (how == "capitalize") out[k] = k == 0 ? std::toupper(c) : std::tolower(c);
      else out[k] = word_start ? std::toupper(c) : std::tolower(c);
      word_start = !alpha;
    }
    return Value::Str(out);
  }

  Value ApplyFilter(const Expr& e) {
    Value v = Eval(*e.args[0]);
    const std::string& f = e.name;
    if (f == "default" || f == "d") {
      auto a = Bind(e, 1, {"default_value", "boolean"}, {Value::Str(""), Value::Bool(false)});
      return v.undefined() || (Truthy(a[1]) && !Truthy(v)) ? a[0] : v;
    }
    if (f == "tojson") {
      auto a = Bind(e, 1, {"ensure_ascii", "indent", "separators", "sort_keys"},
                    {Value::Bool(false), Value::None(), Value::None(), Value::Bool(false)});
      if (Truthy(a[0])) Fail(e.line, "unsupported tojson argument ensure_ascii=True");
      JsonStyle style;
      if (a[1].type == Type::kInt) style.indent = static_cast<int>(std::max<int64_t>(a[1].i, 0));
      else if (a[1].type != Type::kNone) Fail(e.line, "tojson indent must be an integer");
      style.item_sep = style.indent >= 0 ? "," : ", ";
      style.key_sep = ": ";
      if (a[2].type == Type::kList && a[2].list->size() == 2) {
        style.item_sep = RequireString((*a[2].list)[0], e);
        style.key_sep = RequireString((*a[2].list)[1], e);
      } else if (a[2].type != Type::kNone) {
        Fail(e.line, "tojson separators must be a pair of strings");
      }
      style.sort_keys = Truthy(a[3]);
      std::string out;
      DumpJson(v, style, 0, out, e.line);
      return Value::Str(out);
    }
    if (f == "safe" || f == "e" || f == "escape") {
      if (f != "safe") Fail(e.line, "unsupported filter '" + f + "' (autoescaping is off)");
      return v;
    }
    if (f == "length" || f == "count") {
      if (v.type == Type::kString) return Value::Int(static_cast<int64_t>(Decode(v.s).size()));
      if (v.type == Type::kList) return Value::Int(static_cast<int64_t>(v.list->size()));
      if (v.type == Type::kDict) return Value::Int(static_cast<int64_t>(v.dict->size()));
      if (v.undefined()) return Value::Int(0);
      Fail(e.line, std::string("object of type '") + TypeName(v) + "' has no len()");
    }
    if (f == "trim") {
      auto a = Bind(e, 1, {"chars"}, {Value::None()});
      std::u32string chars = a[0].type == Type::kString ? Decode(a[0].s) : U"";
      return Value::Str(StripChars(Str(v), a[0].type == Type::kString ? &chars : nullptr, true, true));
    }
    if (f == "string") return Value::Str(Str(v));
    if (f == "lower" || f == "upper" || f == "capitalize" || f == "title") return ChangeCase(f, Str(v));
    if (f == "replace") {
      auto a = Bind(e, 1, {"old", "new", "count"}, {Value::None(), Value::None(), Value::None()});
      return Value::Str(Replace(Str(v), Str(a[0]), Str(a[1]), a[2].type == Type::kNone ? -1 : a[2].AsInt()));
    }
    if (f == "first" || f == "last") {
      List items = Iterate(v, e.line);
      if (items.empty()) return Value::Undefined(f);
      return f == "first" ? items.front() : items.back();
    }
    if (f == "join") {
      auto a = Bind(e, 1, {"d", "attribute"}, {Value::Str(""), Value::None()});
      if (a[1].type != Type::kNone) Fail(e.line, "unsupported join argument 'attribute'");
      std::string out, sep = Str(a[0]);
      List items = Iterate(v, e.line);
      for (size_t k = 0; k < items.size(); ++k) out += (k ? sep : "") + Str(items[k]);
      return Value::Str(out);
    }
    if (f == "list") return Value::MakeList(Iterate(v, e.line));
    if (f == "items") {
      if (v.undefined()) return Value::MakeList({});
      if (v.type != Type::kDict) Fail(e.line, "'items' expects a mapping");
      List l;
      for (const auto& [k, x] : *v.dict) l.push_back(Value::MakeList({Value::Str(k), x}, /*tuple=*/true));
      return Value::MakeList(std::move(l));
    }
    if (f == "abs") {
      if (v.type == Type::kFloat) return Value::Float(std::fabs(v.f));
      if (v.numeric()) return Value::Int(std::llabs(v.AsInt()));
      Fail(e.line, std::string("bad operand type for abs(): '") + TypeName(v) + "'");
    }
    // int, float: jinja2 falls back to the default (0) for what does not parse.
    auto a = Bind(e, 1, {"default"}, {f == "int" ? Value::Int(0) : Value::Float(0)});
    if (v.numeric()) return f == "int" ? Value::Int(v.AsInt()) : Value::Float(v.AsDouble());
    if (v.type == Type::kString) {
      std::string t = StripChars(v.s, nullptr, true, true);
      char* end = nullptr;
      if (f == "int") {
        long long x = std::strtoll(t.c_str(), &end, 10);
        if (!t.empty() && *end == 0) return Value::Int(x);
        double d = std::strtod(t.c_str(), &end);
        if (!t.empty() && *end == 0 && std::isfinite(d)) return Value::Int(static_cast<int64_t>(d));
      } else {
        double d = std::strtod(t.c_str(), &end);
        if (!t.empty() && *end == 0) return Value::Float(d);
      }
    }
    return a[0];
  }

  bool ApplyTest(const Expr& e) {
    Value v = Eval(*e.args[0]);
    const std::string& t = e.name;
    if (t == "defined") return !v.undefined();
    if (t == "undefined") return v.undefined();
    if (t == "none") return v.type == Type::kNone;
    if (t == "string") return v.type == Type::kString;
    if (t == "number") return v.numeric();
    if (t == "integer") return v.type == Type::kInt;
    if (t == "float") return v.type == Type::kFloat;
    if (t == "boolean") return v.type == Type::kBool;
    if (t == "true") return v.type == Type::kBool && v.b;
    if (t == "false") return v.type == Type::kBool && !v.b;
    if (t == "mapping") return v.type == Type::kDict;
    if (t == "sequence") return v.type == Type::kString || v.type == Type::kList || v.type == Type::kDict;
    if (t == "iterable") return v.type == Type::kString || v.type == Type::kList || v.type == Type::kDict || v.undefined();
    if (t == "even" || t == "odd") {
      if (v.type != Type::kInt && v.type != Type::kBool) Fail(e.line, "'" + t + "' expects an integer");
      return (v.AsInt() % 2 == 0) == (t == "even");
    }
    if (e.args.size() != 2 || !e.kwargs.empty()) Fail(e.line, "test '" + t + "' expects one argument");
    Value other = Eval(*e.args[1]);
    static const std::map<std::string, std::string> kOps = {
        {"eq", "=="}, {"equalto", "=="}, {"==", "=="}, {"ne", "!="}, {"!=", "!="}, {"lt", "<"}, {"<", "<"},
        {"le", "<="}, {"<=", "<="}, {"gt", ">"}, {">", ">"}, {"ge", ">="}, {">=", ">="}, {"in", "in"}};
    return CompareOp(kOps.at(t), v, other, e.line);
  }

  Value Eval(const Expr& e) {
    switch (e.kind) {
      case Expr::Kind::kLiteral: return e.literal;
      case Expr::Kind::kName: return Lookup(e.name, e.line);
      case Expr::Kind::kAttr: {
        Value obj = Eval(*e.args[0]);
        if (obj.undefined()) FailUndefined(obj, e.line);
        if (obj.type == Type::kDict || obj.type == Type::kNamespace) {
          const Value* v = obj.Find(e.name);
          return v ? *v : Value::Undefined(e.name);
        }
        if (obj.type == Type::kList && !e.name.empty() && std::isdigit(static_cast<unsigned char>(e.name[0]))) {
          return Item(obj, Value::Int(std::stoll(e.name)), e.line);
        }
        return Value::Undefined(e.name);
      }
      case Expr::Kind::kItem: return Item(Eval(*e.args[0]), Eval(*e.args[1]), e.line);
      case Expr::Kind::kSlice: {
        Value obj = Eval(*e.args[0]);
        Value parts[3];
        const Value* ptrs[3] = {nullptr, nullptr, nullptr};
        for (int k = 0; k < 3; ++k) {
          if (e.args[k + 1]) { parts[k] = Eval(*e.args[k + 1]); ptrs[k] = &parts[k]; }
        }
        return Slice(obj, ptrs, e.line);
      }
      case Expr::Kind::kCall: return CallFunction(e);
      case Expr::Kind::kMethod: return CallMethod(e);
      case Expr::Kind::kFilter: return ApplyFilter(e);
      case Expr::Kind::kTest: return Value::Bool(ApplyTest(e) != e.negated);
      case Expr::Kind::kNot: return Value::Bool(!Truthy(Eval(*e.args[0])));
      case Expr::Kind::kNeg: {
        Value v = Eval(*e.args[0]);
        if (v.undefined()) FailUndefined(v, e.line);
        if (v.type == Type::kFloat) return Value::Float(-v.f);
        if (v.numeric()) return Value::Int(-v.AsInt());
        Fail(e.line, std::string("bad operand type for unary -: '") + TypeName(v) + "'");
      }
      case Expr::Kind::kBinary: return Arith(e.name, Eval(*e.args[0]), Eval(*e.args[1]), e.line);
      case Expr::Kind::kCompare: {
        Value left = Eval(*e.args[0]);
        for (size_t k = 0; k < e.ops.size(); ++k) {
          Value right = Eval(*e.args[k + 1]);
          if (!CompareOp(e.ops[k], left, right, e.line)) return Value::Bool(false);
          left = std::move(right);
        }
        return Value::Bool(true);
      }
      case Expr::Kind::kAnd: {
        Value left = Eval(*e.args[0]);
        return Truthy(left) ? Eval(*e.args[1]) : left;
      }
      case Expr::Kind::kOr: {
        Value left = Eval(*e.args[0]);
        return Truthy(left) ? left : Eval(*e.args[1]);
      }
      case Expr::Kind::kCond:
        if (Truthy(Eval(*e.args[0]))) return Eval(*e.args[1]);
        return e.args[2] ? Eval(*e.args[2]) : Value::Undefined("if expression");
      case Expr::Kind::kList: {
        List l;
        for (const auto& arg : e.args) l.push_back(Eval(*arg));
        return Value::MakeList(std::move(l), e.name == "tuple");
      }
      case Expr::Kind::kDict: {
        Dict d;
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          Value key = Eval(*e.args[k]);
          if (key.type != Type::kString) Fail(e.line, "dict literal keys must be strings here");
          Value v = Eval(*e.args[k + 1]);
          auto it = std::find_if(d.begin(), d.end(), [&](const auto& kv) { return kv.first == key.s; });
          if (it != d.end()) it->second = std::move(v);
          else d.emplace_back(key.s, std::move(v));
        }
        return Value::MakeDict(std::move(d));
      }
    }
    return Value::None();
  }

  std::map<std::string, Value> globals_;
  std::vector<std::map<std::string, Value>> scopes_;
  int64_t iterations_ = 0;  // loop iterations so far, all loops
};

// epic's own template in DeepSeek-V3's format, written for epic-mkmodel's checkpoints.
constexpr std::string_view kDefaultDeepSeekTemplate = R"jinja({#- epic's DeepSeek-V3-style chat template. -#}
{%- set state = namespace(system='', has_system=false) -%}
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}
    {%- if state.has_system -%}
      {%- set state.system = state.system ~ '\n\n' -%}
    {%- endif -%}
    {%- set state.system = state.system ~ message['content'] -%}
    {%- set state.has_system = true -%}
  {%- endif -%}
{%- endfor -%}
{{- bos_token ~ state.system -}}
{%- for message in messages -%}
  {%- if message['role'] == 'user' -%}
    {{- '<｜User｜>' ~ message['content'] -}}
  {%- elif message['role'] == 'assistant' -%}
    {#- Earlier turns keep only the answer: the reasoning before </think> is dropped. -#}
    {%- set reply = message['content'] if message['content'] is not none else '' -%}
    {%- if '</think>' in reply -%}
      {%- set reply = reply.split('</think>')[-1] -%}
    {%- endif -%}
    {{- '<｜Assistant｜>' ~ reply ~ '<｜end▁of▁sentence｜>' -}}
  {%- elif message['role'] != 'system' -%}
    {{- raise_exception('unsupported message role: ' ~ message['role']) -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<｜Assistant｜>' -}}
{%- endif -%}
)jinja";

}  // namespace
}  // namespace chat_template_internal

StatusOr<ChatTemplate> ChatTemplate::Parse(std::string_view source) {
  using namespace chat_template_internal;
  try {
    auto program = std::make_shared<Program>();
    program->body = Parser(Lex(source)).ParseTemplate();
    return ChatTemplate(std::move(program));
  } catch (const TemplateError& e) {
    return ToStatus(e);
  }
}

StatusOr<std::string> ChatTemplate::Render(const nlohmann::json& context) const {
  using namespace chat_template_internal;
  try {
    std::string out;
    Renderer renderer(context);
    renderer.Run(program_->body, out);
    return out;
  } catch (const TemplateError& e) {
    return ToStatus(e);
  }
}

std::string_view DefaultDeepSeekChatTemplate() { return chat_template_internal::kDefaultDeepSeekTemplate; }

}  // namespace epic::text
