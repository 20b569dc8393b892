-- 模型名称反向映射
local model_map = {
  ["llama-3-70b-instruct"] = "gpt-4",
  ["qwen-72b-chat"] = "gpt-3.5"
}

local model = response.body.model
local original_model = model_map[model] or model

-- 修改响应体
local new_body = {}
for k, v in pairs(response.body) do
  new_body[k] = v
end
new_body.model = original_model

return {
  status_code = response.status_code,
  body = new_body,
  headers = response.headers
}
