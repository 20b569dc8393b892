local viplevel = request.body.viplevel or 0
if viplevel >= 3 then
  return "ultra"
elseif viplevel >= 1 then
  return "high-performance"
else
  return "standard"
end
