import fc from 'fast-check';

/**
 * Generated hostile inputs, shared by unit, integration and browser tests: a hand-picked list once
 * hid `/.//evil.example`, which a URL parser normalises into the protocol-relative `//evil.example`.
 */

const RETURN_TO_PIECES = ['/', '.', '..', ';', '%', '%2e', '%2E', '%2f', '%2F', '%5c', '%5C', '\\', '@', ':', '//', '?', '#', '%25', '%09', '\t', 'evil.example', 'a', 'http:', 'javascript:'];

/** Concatenations of what URL parsers treat specially, mostly starting like a path. */
export const hostileReturnTo = fc
  .tuple(fc.constantFrom('/', '', '/.', '/..', '\\', '//'), fc.array(fc.constantFrom(...RETURN_TO_PIECES), { maxLength: 12 }))
  .map(([head, rest]) => head + rest.join(''));

/** Percent-escapes decodeURIComponent refuses: bad hex, lone bytes, overlong, surrogate, past U+10FFFF, cut short. */
const UNDECODABLE_ESCAPES = ['%', '%z', '%zz', '%g0', '%0', '%0g', '%%', '%C3', '%c3', '%80', '%BF', '%C0%80', '%C1%BF', '%E0%80%80', '%ED%A0%80', '%F4%90%80%80', '%F5%80%80%80', '%FF', '%E2%82', '%F0%9F%98', '%C3%28'];
/** Path pieces that decode: ASCII, escaped ASCII and UTF-8 of every length. */
const DECODABLE_PIECES = ['a', 'b1', '-', '_', '~', '%20', '%2D', '%7e', '%C3%A9', '%c3%a9', '%E2%82%AC', '%F0%9F%98%80', '%F4%8F%BF%BF', '%EF%BF%BD'];

/** Whether decodeURIComponent takes `text`: what Next's router and the proxy core both ask of a path. */
export const decodes = (text: string) => {
  try {
    decodeURIComponent(text);
    return true;
  } catch {
    return false;
  }
};

/** A path segment that decodes: no dot segment, never empty. */
export const decodableSegment = fc.array(fc.constantFrom(...DECODABLE_PIECES), { minLength: 1, maxLength: 4 }).map((pieces) => pieces.join(''));

/** Segments after `/api/proxy/<api>/`, at least one of them with a percent-escape that does not decode. */
export const undecodablePath = fc
  .tuple(
    fc.array(decodableSegment, { maxLength: 2 }),
    fc.array(fc.constantFrom(...DECODABLE_PIECES), { maxLength: 2 }),
    fc.constantFrom(...UNDECODABLE_ESCAPES),
    fc.array(fc.constantFrom(...DECODABLE_PIECES), { maxLength: 2 }),
    fc.array(decodableSegment, { maxLength: 2 }),
  )
  .map(([before, prefix, escape, suffix, after]) => [...before, prefix.join('') + escape + suffix.join(''), ...after].join('/'))
  // `%0` then `a` is `%0a`, which decodes: such compositions are not what this generates.
  .filter((path) => !decodes(path));
